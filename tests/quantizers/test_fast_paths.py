"""The fast simulated-quantization paths equal the literal (reference) implementations bit for bit.

* ``LogIntSoftmax.quantize`` / ``fake_quant`` (float64 table path) vs ``quantize_exact`` (int64);
* ``int_layernorm`` / ``int_layernorm_fake_quant`` vs ``int_layernorm_reference``;
* ``fake_quant_uniform`` / ``PTFQuantizer.fake_quant`` (chunked, in place) vs the literal formula;
* ``LogSqrt2Quantizer.fake_quant`` (chunked) vs ``log_sqrt2_fake_quant``.

"Bit for bit" means equal integer codes, and float outputs equal as bit patterns (so +0.0 vs −0.0
and NaN payloads count). Each case also runs with tiny chunks, so remainder chunks are covered.
"""
import pytest
import torch
import torch.nn.functional as F

import fqvit_det.quantizers.base as qbase
from fqvit_det.quantizers.base import round_ste
from fqvit_det.quantizers.lis import LogIntSoftmax, log2_round_half_up
from fqvit_det.quantizers.log import (LogSqrt2Quantizer, log2_dequantize, log_sqrt2_fake_quant,
                                      log_sqrt2_fake_quant_chunked)
from fqvit_det.quantizers.ptf import (PTFQuantizer, _int_layernorm_rows, _ln_params,
                                      int_layernorm, int_layernorm_fake_quant,
                                      int_layernorm_reference)
from fqvit_det.quantizers.uniform import (UniformQuantizer, fake_quant_chunked, fake_quant_uniform,
                                          fake_quant_uniform_reference)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so −0.0 ≠ +0.0)."""
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits_of(a), bits_of(b))


@pytest.fixture(params=['default', 'tiny'])
def chunks(request, monkeypatch):
    """Run every test with the default chunk size and with tiny chunks (many + a remainder)."""
    if request.param == 'tiny':
        monkeypatch.setattr(qbase, 'CHUNK_ELEMS', 4999)
    return request.param


def calibrate(q, *batches):
    q.set_mode('observe')
    for b in batches:
        q(b)
    q.finalize()
    q.set_mode('quant')
    return q


# ------------------------------------------------------------------------------------------------
# Log-Int-Softmax
# ------------------------------------------------------------------------------------------------
def test_code_from_ratio_identity():
    """code = round-half-up(log2 R) = ⌊log2(R/0.75)⌋, read from the float64 exponent of R/0.75,
    for every R up to 2^20 and around every power of two (and 1.5·2^k) up to 2^52."""
    rs = set(range(1, 2 ** 20 + 1))
    for k in range(1, 53):
        for base in (2 ** k, 3 * 2 ** (k - 1)):
            rs.update(v for v in range(base - 3, base + 4) if 1 <= v < 2 ** 53)
    r = torch.tensor(sorted(rs), dtype=torch.int64)
    w = r.to(torch.float64) / 0.75
    code = torch.bitwise_right_shift(w.view(torch.int64), 52) - 1023
    assert torch.equal(code, log2_round_half_up(r))


def attention_like_logits(g, B, H, N, scale=1.0):
    """Logits with the structure of attention: a few strong keys per row, correlated rows."""
    q = torch.randn(B, H, N, 16, generator=g)
    k = torch.randn(B, H, N, 16, generator=g)
    k[..., :3, :] *= 4                                     # a few dominant keys
    return (q @ k.transpose(-2, -1)) * (scale / 4)


LIS_CASES = [
    # (shape, logit multiplier, bits, logit_bits)
    ((2, 3, 197, 197), 1.0, 4, 8),
    ((2, 3, 197, 197), 2.5, 4, 8),
    ((1, 2, 50, 50), 0.05, 4, 8),
    ((1, 2, 50, 50), 5.0, 4, 8),
    ((1, 3, 64, 64), 3.0, 2, 8),
    ((1, 3, 64, 64), 3.0, 3, 8),
    ((1, 3, 64, 64), 3.0, 5, 8),
    ((1, 3, 64, 64), 3.0, 8, 8),
    ((1, 3, 64, 64), 0.5, 4, 6),
    ((1, 3, 64, 64), 0.2, 4, 4),
]


@pytest.mark.parametrize('shape,mult,bits,logit_bits', LIS_CASES)
def test_lis_fast_equals_exact(shape, mult, bits, logit_bits, chunks, device):
    g = torch.Generator().manual_seed(int(mult * 100) + 10 * bits + logit_bits)
    x = attention_like_logits(g, *shape[:3], scale=mult).to(device)
    m = calibrate(LogIntSoftmax(bits=bits, logit_bits=logit_bits).to(device), x)
    assert m.logit_scale < 1.0
    assert m._fast(x, want_codes=True) is not None          # the fast path is really taken
    exact = m.quantize_exact(x)
    assert torch.equal(m.quantize(x), exact)
    assert same_bits(m(x), m.dequantize(exact).to(x.dtype))
    assert same_bits(m.fake_quant(x), log2_dequantize(exact, 1.0))


def test_lis_fast_long_rows_and_special_rows(chunks):
    """3136-token rows (the published int64 sums would overflow), a one-hot row, constant rows,
    rows whose tail underflows the exp (z = 0 → zero code) and 8-bit logits over a wide range."""
    g = torch.Generator().manual_seed(11)
    x = torch.zeros(1, 2, 6, 3136)
    x[0, 0, 0, :64] = torch.rand(64, generator=g) * 0.2      # small logit scale, long rows
    x[0, 0, 1] = torch.randn(3136, generator=g) * 4
    x[0, 0, 2, 7] = 60.0                                    # one-hot after quantization
    x[0, 0, 3] = -2.0                                       # constant row
    x[0, 1] = torch.randn(6, 3136, generator=g) * 12        # wide range: many zero codes
    for bits in (4, 8):
        m = calibrate(LogIntSoftmax(bits=bits), x)
        assert m._fast(x, want_codes=True) is not None
        exact = m.quantize_exact(x)
        assert torch.equal(m.quantize(x), exact)
        assert same_bits(m(x), m.dequantize(exact))
        assert (exact == 0).any() and (exact > 8).any()
        if bits == 4:
            assert (exact == -1).any()


def test_lis_small_scale_long_rows(chunks):
    """The case of ``test_lis_long_rows_no_overflow``: p ≈ 1/3136, codes 11 and 12."""
    g = torch.Generator().manual_seed(7)
    x = torch.zeros(1, 1, 2, 3136)
    x[..., :64] = torch.rand(1, 1, 2, 64, generator=g) * 0.2
    m = calibrate(LogIntSoftmax(), x)
    assert m._fast(x, want_codes=True) is not None
    assert torch.equal(m.quantize(x), m.quantize_exact(x))
    assert same_bits(m(x), m.dequantize(m.quantize_exact(x)))


def test_lis_falls_back_when_not_exact(chunks):
    """16-bit logits over a wide range exceed the float64 exactness bound: the exact path runs
    (same result as ``quantize_exact``, including its headroom shift); NaN logits too."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 1, 3, 512, generator=g) * 8
    m = calibrate(LogIntSoftmax(bits=8, logit_bits=16), x)
    assert m._fast(x, want_codes=True) is None
    assert torch.equal(m.quantize(x), m.quantize_exact(x))
    m = calibrate(LogIntSoftmax(), x)
    bad = x.clone()
    bad[0, 0, 1, 3] = float('nan')
    assert m._fast(bad, want_codes=False) is None


def test_lis_huge_logit_scale_falls_back():
    """Logit scale > 1.67: c_int = ⌊(c/a)/S²⌋ = 0, the row maximum's exp is 0; exact path."""
    x = torch.randn(1, 2, 16, 16) * 300
    m = calibrate(LogIntSoftmax(), x)
    assert m.logit_scale > 1.67 and m._fast(x, want_codes=True) is None
    assert torch.equal(m.quantize(x), m.quantize_exact(x))


def test_lis_non_integral_zero_point_falls_back():
    x = torch.randn(1, 2, 8, 8)
    m = calibrate(LogIntSoftmax(), x)
    m.logit_quant.set_params(m.logit_quant.scale, 100.5)
    assert m._fast(x, want_codes=True) is None
    assert torch.equal(m.quantize(x), m.quantize_exact(x))


# ------------------------------------------------------------------------------------------------
# Integer LayerNorm
# ------------------------------------------------------------------------------------------------
def residual_like(g, B=2, N=197, C=192, outliers=True):
    """Residual-stream-like input: per-channel ranges differing by orders of magnitude."""
    x = torch.randn(B, N, C, generator=g) * (torch.rand(C, generator=g) * 2 + 0.1)
    x = x + torch.randn(C, generator=g) * 0.5
    if outliers:
        x[..., :4] *= 20
    return x


def ln_setup(g, C=192, bits=8, K=3, x=None, out_bits=8, device='cpu'):
    x = (residual_like(g, C=C) if x is None else x).to(device)
    ptf = calibrate(PTFQuantizer(bits, num_factors=K).to(device), x)
    gamma = torch.randn(C, generator=g) * 0.5 + 1.0
    gamma[::7] *= -1                                        # some negative γ
    beta = torch.randn(C, generator=g) * 0.3
    gamma, beta = gamma.to(device), beta.to(device)
    oq = calibrate(UniformQuantizer(out_bits).to(device), F.layer_norm(x, (C,), gamma, beta))
    return x, ptf, gamma, beta, oq


def ln_both(codes, ptf, gamma, beta, oq, **kw):
    args = (codes, ptf.base_scale, gamma, beta, oq.scale, oq.zero_point)
    kw.setdefault('out_bits', oq.bits)
    return int_layernorm(*args, **kw), int_layernorm_reference(*args, **kw)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('fold_mean', [True, False])
@pytest.mark.parametrize('dyadic_bits', [8, 4, 12])
def test_int_layernorm_fast_equals_reference(seed, fold_mean, dyadic_bits, chunks, device):
    g = torch.Generator().manual_seed(seed)
    x, ptf, gamma, beta, oq = ln_setup(g, device=device)
    codes = ptf.shifted_codes(x)
    fast, ref = ln_both(codes, ptf, gamma, beta, oq, fold_mean=fold_mean, dyadic_bits=dyadic_bits)
    assert fast.dtype == torch.int32 and torch.equal(fast, ref)
    fq = int_layernorm_fake_quant(x, ptf, gamma, beta, oq, fold_mean=fold_mean,
                                  dyadic_bits=dyadic_bits)
    assert same_bits(fq, oq.dequantize(ref).to(x.dtype))


def test_int_layernorm_fast_route_is_taken():
    g = torch.Generator().manual_seed(3)
    x, ptf, gamma, beta, oq = ln_setup(g)
    params = _ln_params(ptf.base_scale, gamma, beta, oq.scale, x.shape[-1], x.device)
    rows = ptf.shifted_codes(x).reshape(-1, x.shape[-1]).to(torch.float64)
    assert _int_layernorm_rows(rows, params, 1e-5, 8, True) is not None


def test_int_layernorm_edge_cases(chunks):
    """γ = 0 and |a| exactly a power of two (both take the literal log2 route), no affine, constant
    tokens (σ² = eps), tokens with a huge mean, wide C, 4-bit output, 16-bit input codes."""
    g = torch.Generator().manual_seed(4)
    C = 768
    x, ptf, gamma, beta, oq = ln_setup(g, C=C)
    x[0, 0] = 3.0                                           # constant token
    x[0, 1] = x[0, 1] * 0.01 + 50.0                         # |μ|/σ large
    codes = ptf.shifted_codes(x)
    for fm in (True, False):
        g0 = gamma.clone()
        g0[5] = 0.0
        assert torch.equal(*ln_both(codes, ptf, g0, beta, oq, fold_mean=fm))
        assert torch.equal(*ln_both(codes, ptf, None, None, oq, fold_mean=fm))
        q4 = calibrate(UniformQuantizer(4), F.layer_norm(x, (C,), gamma, beta))
        assert torch.equal(*ln_both(codes, ptf, gamma, beta, q4, fold_mean=fm))
    # multipliers that are exact powers of two: Δ_1/σ·γ/Δ_out = 2^k for a constant-σ token
    codes_in = torch.tensor([[1, -1] * 4, [3, -3] * 4], dtype=torch.int32)
    d1, dout = torch.tensor(0.25), torch.tensor(0.5)
    for gm in (torch.full((8,), 2.0), torch.full((8,), 1.0 - 2 ** -20)):
        args = (codes_in, d1, gm, torch.zeros(8), dout, torch.tensor(128.0))
        assert torch.equal(int_layernorm(*args, eps=0.0), int_layernorm_reference(*args, eps=0.0))
    # 16-bit PTF codes with K = 3: C·S2 can leave the exact range → reference rows, same codes
    big = torch.randint(-(2 ** 18), 2 ** 18, (2, 16, C), generator=g, dtype=torch.int32)
    assert torch.equal(*ln_both(big, ptf, gamma, beta, oq))


def test_int_layernorm_nan_rows_use_reference():
    """NaN rows are handed to the reference, so both behave alike (the int64 reference divides
    by zero on the garbage codes a NaN becomes)."""
    g = torch.Generator().manual_seed(5)
    x, ptf, gamma, beta, oq = ln_setup(g)
    x[1, 3, 7] = float('nan')
    with pytest.raises(RuntimeError):
        int_layernorm_reference(ptf.shifted_codes(x), ptf.base_scale, gamma, beta, oq.scale,
                                oq.zero_point)
    with pytest.raises(RuntimeError):
        int_layernorm_fake_quant(x, ptf, gamma, beta, oq)


def test_quant_layernorm_module_uses_fused_path():
    from fqvit_det.nn.modules import QuantLayerNorm
    g = torch.Generator().manual_seed(6)
    x, ptf, gamma, beta, oq = ln_setup(g)
    ln = torch.nn.LayerNorm(x.shape[-1])
    ln.weight.data.copy_(gamma)
    ln.bias.data.copy_(beta)
    mod = QuantLayerNorm.from_float(ln, ptf, oq, integer=True)
    with torch.no_grad():
        out = mod(x)
    ref = oq.dequantize(int_layernorm_reference(ptf.shifted_codes(x), ptf.base_scale, gamma, beta,
                                                oq.scale, oq.zero_point, eps=ln.eps))
    assert same_bits(out, ref)


# ------------------------------------------------------------------------------------------------
# Uniform and PTF fake quantization
# ------------------------------------------------------------------------------------------------
def special_values(x):
    flat = x.reshape(-1)
    vals = torch.tensor([0.0, -0.0, -1e-30, 1e-30, float('inf'), float('-inf'), float('nan'),
                         1e30, -1e30], device=x.device)
    flat[:vals.numel()] = vals
    return x


UNIFORM_CASES = [
    # (shape, ch_axis, symmetric)
    ((4, 197, 192), None, False),
    ((4, 197, 192), None, True),
    ((4, 197, 192), -1, False),
    ((2, 3, 197, 64), 1, True),
    ((64, 3, 4, 4), 0, True),
    ((50,), None, False),
]


@pytest.mark.parametrize('shape,ch_axis,symmetric', UNIFORM_CASES)
@pytest.mark.parametrize('bits', [4, 8])
def test_uniform_fake_quant_equals_formula(shape, ch_axis, symmetric, bits, chunks, device):
    g = torch.Generator().manual_seed(len(shape) * 10 + bits)
    x = (torch.randn(*shape, generator=g) * 3).to(device)
    q = calibrate(UniformQuantizer(bits, symmetric=symmetric, ch_axis=ch_axis).to(device), x)
    x = special_values(x.clone())
    # tiny negatives round to −0.0 before the zero point is added: the formula returns +0.0
    x.reshape(-1)[20:40] = (-torch.rand(20, generator=g) * float(q.scale.min()) * 0.49).to(device)
    ref = fake_quant_uniform_reference(x, q.scale, q.zero_point, q.qmin, q.qmax, ch_axis)
    assert fake_quant_chunked(x, q.scale, q.zero_point, q.qmin, q.qmax, ch_axis) is not None
    assert same_bits(q.fake_quant(x), ref)
    assert same_bits(q(x), ref)
    if x.dim() == 4:                                        # strided view (q / k / v layout)
        xs = x.transpose(1, 2)
        refs = fake_quant_uniform_reference(xs, q.scale, q.zero_point, q.qmin, q.qmax,
                                            None if ch_axis is None else (2 if ch_axis == 1 else ch_axis))
        outs = fake_quant_uniform(xs, q.scale, q.zero_point, q.qmin, q.qmax,
                                  None if ch_axis is None else (2 if ch_axis == 1 else ch_axis))
        assert same_bits(outs, refs)


def test_uniform_non_integral_zero_point_and_fallbacks(chunks):
    g = torch.Generator().manual_seed(9)
    x = special_values(torch.randn(3, 50, 40, generator=g))
    s, z = torch.tensor(0.02), torch.tensor(100.25)
    assert same_bits(fake_quant_uniform(x, s, z, 0, 255),
                     fake_quant_uniform_reference(x, s, z, 0, 255))
    # broadcasting that changes the shape (a search over candidate scales) and mixed dtypes
    cands = torch.tensor([[0.01], [0.02], [0.05]])
    flat = x.reshape(-1)[:100]
    assert fake_quant_chunked(flat, cands, torch.zeros_like(cands), -8, 7) is None
    assert same_bits(fake_quant_uniform(flat, cands, torch.zeros_like(cands), -8, 7),
                     fake_quant_uniform_reference(flat, cands, torch.zeros_like(cands), -8, 7))
    xd = x.double()
    assert fake_quant_chunked(xd, s, z, 0, 255) is None
    assert same_bits(fake_quant_uniform(xd, s, z, 0, 255),
                     fake_quant_uniform_reference(xd, s, z, 0, 255))


def test_uniform_autograd_keeps_straight_through_estimator():
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(5, 300, generator=g) * 2).requires_grad_()
    s, z = torch.tensor(0.03), torch.tensor(12.0)
    y = fake_quant_uniform(x, s, z, 0, 255)
    assert y.requires_grad
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (torch.clamp(round_ste(x2 / s) + z, 0, 255) - z).mul(s).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    with torch.no_grad():
        assert same_bits(fake_quant_uniform(x, s, z, 0, 255), y.detach())


@pytest.mark.parametrize('K', [0, 3])
def test_ptf_fake_quant_equals_formula(K, chunks, device):
    g = torch.Generator().manual_seed(12)
    x = residual_like(g).to(device)
    q = calibrate(PTFQuantizer(8, num_factors=K).to(device), x)
    x = special_values(x.clone())
    s = q.channel_scale
    ref = ((torch.clamp(round_ste(x / s) + q.zero_point, q.qmin, q.qmax) - q.zero_point)
           * s).to(x.dtype)                                # PTFQuantizer's formula
    assert same_bits(q.fake_quant(x), ref)
    xg = x[:, :5].clone().nan_to_num_().requires_grad_()
    out = q.fake_quant(xg)
    out.sum().backward()                                    # STE path under autograd
    assert xg.grad is not None


def test_integer_paths_under_autograd():
    """Inputs that require grad (grad mode on): the fast paths run, and like the references
    (integer codes) their outputs carry no gradient."""
    g = torch.Generator().manual_seed(13)
    logits = attention_like_logits(g, 1, 2, 20)
    m = calibrate(LogIntSoftmax(), logits)
    lg = logits.clone().requires_grad_()
    out = m(lg)
    assert not out.requires_grad and same_bits(out, m.dequantize(m.quantize_exact(logits)))
    x, ptf, gamma, beta, oq = ln_setup(g)
    out = int_layernorm_fake_quant(x.clone().requires_grad_(), ptf, gamma.requires_grad_(), beta,
                                   oq)
    assert not out.requires_grad
    p = torch.softmax(logits, -1).requires_grad_()
    q = LogSqrt2Quantizer(bits=4)
    q.set_params(0.9)
    q.set_mode('quant')
    assert not q(p).requires_grad and same_bits(q(p), log_sqrt2_fake_quant(p.detach(), q.delta, 4))


def test_chunk_kernels_restore_thread_count(monkeypatch):
    """With ``CHUNK_THREADS = 1`` the kernels run single-threaded and restore the caller's setting,
    also when they raise."""
    monkeypatch.setattr(qbase, 'CHUNK_THREADS', 1)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(3, 40, 16)
        q = calibrate(UniformQuantizer(8), x)
        seen = []
        orig = torch.div

        def spy(*a, **k):
            seen.append(torch.get_num_threads())
            return orig(*a, **k)
        torch.div = spy
        try:
            q(x)
        finally:
            torch.div = orig
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        g = torch.Generator().manual_seed(5)
        xl, ptf, gamma, beta, oq = ln_setup(g)

        def boom(*a, **k):
            raise ArithmeticError('boom')
        import fqvit_det.quantizers.ptf as ptf_mod
        monkeypatch.setattr(ptf_mod, '_int_layernorm_rows', boom)
        with pytest.raises(ArithmeticError):
            int_layernorm_fake_quant(xl, ptf, gamma, beta, oq)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# log√2 quantizer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [2, 3, 4, 6, 8])
@pytest.mark.parametrize('delta', [1.0, 0.37, 1e-3])
def test_log_sqrt2_chunked_equals_reference(bits, delta, chunks, device):
    g = torch.Generator().manual_seed(bits)
    x = torch.softmax(torch.randn(2, 3, 50, 50, generator=g) * 3, -1)
    x.reshape(-1)[:8] = torch.tensor([0.0, -0.0, float('nan'), float('inf'), 1e-30, -0.2,
                                      2.0, 1e-45])
    x = x.to(device)
    d = torch.tensor(delta, device=device)
    ref = log_sqrt2_fake_quant(x, d, bits)
    out = log_sqrt2_fake_quant_chunked(x, d, bits)
    assert out is not None and same_bits(out, ref)
    xs = x.transpose(-1, -2)
    assert same_bits(log_sqrt2_fake_quant_chunked(xs, d, bits), log_sqrt2_fake_quant(xs, d, bits))
    q = LogSqrt2Quantizer(bits=bits).to(device)
    q.set_params(delta)
    q.set_mode('quant')
    assert same_bits(q(x), ref)


def test_log_sqrt2_underflowing_table_falls_back():
    """Δ so small that 2^(−c/2)·Δ collapses in float32 subnormals: the reference runs."""
    x = torch.softmax(torch.randn(4, 64), -1)
    d = torch.tensor(2.0 ** -23)
    assert log_sqrt2_fake_quant_chunked(x, d, 8) is None
    q = LogSqrt2Quantizer(bits=8)
    q.set_params(float(d))
    q.set_mode('quant')
    assert same_bits(q(x), log_sqrt2_fake_quant(x, d, 8))


# --- PTQ4ViT twin uniform ------------------------------------------------------------------------
def _twin_inputs(kind):
    g = torch.Generator().manual_seed(7)
    if kind == 'softmax':
        x = torch.softmax(torch.randn(2, 3, 17, 17, generator=g) * 4, dim=-1)
        x.view(-1)[:4] = torch.tensor([0.0, 1.0, 2.0 ** -7, -1e-9])   # exact split, ends, below 0
    else:
        x = F.gelu(torch.randn(2, 17, 33, generator=g) * 3)
        x.view(-1)[:4] = torch.tensor([0.0, -0.16997124, -1e-9, 1e-9])
    x.view(-1)[4:7] = torch.tensor([float('inf'), float('-inf'), float('nan')])
    return x


@pytest.mark.parametrize('bits', [3, 4, 6, 8])
@pytest.mark.parametrize('exp', [0, 3, 7, 19])
def test_twin_softmax_fast_equals_reference(bits, exp, chunks):
    from fqvit_det.quantizers.twin import twin_softmax_fake_quant, twin_softmax_fake_quant_fast
    x = _twin_inputs('softmax')
    assert same_bits(twin_softmax_fake_quant_fast(x, torch.tensor(exp), bits),
                     twin_softmax_fake_quant(x, exp, bits))


@pytest.mark.parametrize('bits', [3, 4, 6, 8])
@pytest.mark.parametrize('m', [-5, 0, 4, 24])
def test_twin_gelu_fast_equals_reference(bits, m, chunks):
    from fqvit_det.quantizers.twin import twin_gelu_fake_quant, twin_gelu_fake_quant_fast
    x = _twin_inputs('gelu')
    assert same_bits(twin_gelu_fake_quant_fast(x, torch.tensor(m), bits), twin_gelu_fake_quant(x, m, bits))


def test_twin_quantizers_use_the_fast_path_and_keep_autograd():
    from fqvit_det.quantizers import twin
    q = twin.TwinUniformSoftmaxQuantizer(bits=4)
    q.set_params(5)
    q.set_mode('quant')
    x = _twin_inputs('softmax')[..., 1:, :].contiguous()
    calls = []
    orig = twin._twin_fake_quant_chunked
    twin._twin_fake_quant_chunked = lambda *a: calls.append(1) or orig(*a)
    try:
        out = q(x)
    finally:
        twin._twin_fake_quant_chunked = orig
    assert calls and same_bits(out, twin.twin_softmax_fake_quant(x, 5, 4))
    xg = torch.rand(3, 5, requires_grad=True)
    q(xg).sum().backward()              # straight-through: d/dx = 1 inside the range
    assert torch.equal(xg.grad, torch.ones_like(xg))


# --- AdaLog --------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [3, 4, 6])
@pytest.mark.parametrize('q,delta,shift', [(37, 1.0, 0.0), (10, 0.7, 0.0), (137, 1.0, 0.0),
                                           (23, 2.5, 0.16997124), (51, 0.9, 0.16997124)])
def test_adalog_chunked_equals_reference(bits, q, delta, shift, chunks, device):
    from fqvit_det.quantizers.adalog import AdaLogQuantizer, adalog_fake_quant
    g = torch.Generator().manual_seed(3)
    if shift:
        x = F.gelu(torch.randn(3, 29, 41, generator=g) * 3)
    else:
        x = torch.softmax(torch.randn(3, 29, 41, generator=g) * 5, dim=-1)
    x.view(-1)[:8] = torch.tensor([0.0, -shift, -0.5, 1e-30, delta, 4.0, float('inf'), float('nan')])
    x = x.to(device)
    aq = AdaLogQuantizer(bits=bits, shift=shift).to(device)
    aq.set_params(delta=delta, q=q)
    aq.set_mode('quant')
    ref = adalog_fake_quant(x, aq.delta, aq.q, bits, aq.r, shift, True, aq.lut)
    assert same_bits(aq(x), ref)
    xg = x.clone().requires_grad_(True)          # autograd keeps the reference path
    assert same_bits(aq(xg).detach(), ref)


def test_single_threaded_leaves_thread_count_alone_off_the_cpu(monkeypatch):
    """``torch.set_num_threads`` is a CPU setting: with a tensor on another device (here the
    'meta' device) the wrapper must not touch it."""
    monkeypatch.setattr(qbase, 'CHUNK_THREADS', 1)
    calls = []
    monkeypatch.setattr(torch, 'set_num_threads', lambda k: calls.append(k))

    @qbase.single_threaded
    def kernel(x):
        return x

    kernel(torch.empty(3, device='meta'))
    assert calls == []
    if torch.get_num_threads() != 1:
        kernel(torch.empty(3))
        assert calls and calls[0] == 1
