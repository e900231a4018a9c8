"""The compiled CPU kernels (``fqvit_det.integer.kernels``) against the torch-op path: the same
integers and floats, bit for bit, on calibrated tiny ViTs of every power-of-two probability kind."""
import pytest
import torch

from fqvit_det.integer import kernels
from fqvit_det.integer.attention import IntegerAttention

from .test_int_attention import calibrated, capture_attention


@pytest.fixture
def backend():
    """Restores the backend a test switches."""
    before = kernels._backend()
    yield kernels.set_backend
    kernels.set_backend(before)


def test_the_kernels_build_here(backend):
    """This project's machines have a C++ compiler: the compiled path must be what runs."""
    backend('cpp')
    info = kernels.info()
    assert {k: info[k] for k in ('backend', 'compiled', 'error')} == dict(
        backend='cpp', compiled=True, error=None)
    assert isinstance(info['amx'], bool)


@pytest.mark.parametrize('method', ['repq_w4a4', 'adalog_6', 'ptq4vit'])
def test_compiled_attention_equals_the_torch_path(backend, method):
    model, x = calibrated(method, 'cpu')
    caps = capture_attention(model, x)
    for blk, cap in zip(model.blocks, caps):
        ia = IntegerAttention(blk.attn, method='simulation')
        q, k, v = ia.split(cap['qkv'])
        backend('torch')
        ref = ia.attend_codes(q, k, v)
        backend('cpp')
        assert ia._compiled_codes(q, k, v) is not None       # the compiled path applies
        ours = ia.attend_codes(q, k, v)
        assert ours.dtype == torch.int32 and torch.equal(ours, ref)
        ia.chunk_elems = 1                                   # one image per chunk: the same
        assert torch.equal(ia.attend_codes(q, k, v), ref)
        ia.vector_kernels = False                            # the scalar code / plane loops
        assert torch.equal(ia.attend_codes(q, k, v), ref)


def test_reciprocal_quotients_are_correctly_rounded(backend):
    """The integer LayerNorm divides by Δ_out (and C) as a·RN(1/d) with two fma corrections
    (Markstein): it must equal IEEE division on every input, including quotients next to a
    rounding boundary (a = q·d ± a few ulps of a) and divisors with long significands."""
    backend('cpp')
    ops = kernels.native()
    g = torch.Generator().manual_seed(0)
    for d in [0.1447228193283081, 0.05213913321495056, 192.0, 3.0, 1 - 2 ** -52, 1.5e-7, 7.1e5]:
        a = torch.rand(200_000, generator=g, dtype=torch.float64)
        a = torch.cat([a * 10.0 ** torch.randint(-12, 13, a.shape, generator=g), -a[:1000],
                       torch.zeros(1)])
        q = torch.randint(1, 2 ** 40, (20_000,), generator=g).double() * 2.0 ** -20
        near = q * d                                   # products just around exact multiples
        near = torch.cat([torch.nextafter(near, near + 1), near, torch.nextafter(near, near - 1)])
        x = torch.cat([a, near])
        assert torch.equal(ops.quotients(x, d), x / d)


@pytest.mark.parametrize('method', ['fqvit_lis', 'fqvit_lis3', 'fqvit_lis5'])
def test_compiled_lis_attention_equals_the_torch_path(backend, method):
    """FQ-ViT's Log-Int-Softmax core: 4-bit codes (16 thresholds) are counted in AVX-512 lanes
    where the CPU has them, other widths (and vector_kernels=False) take the binary-search
    route; all give the torch path's codes. 5 bits: operand groups whose top shift is 31."""
    model, x = calibrated(method, 'cpu')
    caps = capture_attention(model, x)
    for blk, cap in zip(model.blocks, caps):
        ia = IntegerAttention(blk.attn, method='simulation')
        q, k, v = ia.split(blk.attn.qkv.out_quantizer.quantize(cap['qkv']))
        backend('torch')
        ref = ia.attend_codes(q, k, v)
        backend('cpp')
        assert ia._compiled_codes(q, k, v) is not None       # the compiled path applies
        for vector in (True, False):
            ia.vector_kernels = vector
            assert torch.equal(ia.attend_codes(q, k, v), ref)


def test_probability_codes_match_the_quantizers(backend):
    """The kernels' code formulas = the quantizers' own codes (ties, 0, 1, tiny values): from
    log2(x/Δ) for log2 / log√2 / AdaLog, from the probabilities for twin uniform."""
    from fqvit_det.quantizers.adalog import adalog_quantize
    from fqvit_det.quantizers.log import log2_quantize, log_sqrt2_quantize
    from fqvit_det.quantizers.twin import twin_softmax_codes, twin_softmax_steps
    backend('cpp')
    ops = kernels.native()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4000, generator=g), torch.rand(1000, generator=g) * 1e-6,
                   torch.tensor([0.0, 1.0, 0.5, 2.0 ** -0.5, 2.0 ** -7.5, 3.0, 1 / 127, 2 ** -4])])
    delta = torch.tensor(0.9)
    l = torch.log2(x / delta)
    for mode, bits, r, q, ref in [(0, 4, 1.0, 1.0, log2_quantize(x, delta, 4)),
                                  (1, 4, 1.0, 1.0, log_sqrt2_quantize(x, delta, 4)),
                                  (1, 6, 1.0, 1.0, log_sqrt2_quantize(x, delta, 6)),
                                  (2, 4, 37.0, 5.0, adalog_quantize(x, delta, 5, 4, r=37))]:
        assert torch.equal(ops.prob_codes(l, mode, r, q, 0.0, bits), ref)
    for bits, split in [(8, 4), (6, 3)]:
        s, d1, d2 = twin_softmax_steps(split, bits)
        assert torch.equal(ops.prob_codes(x, 3, float(d1), float(d2), float(s), bits),
                           twin_softmax_codes(x, split, bits))


def test_a_failed_build_warns_in_auto_and_raises_in_cpp(monkeypatch, backend):
    def broken():
        raise OSError('no compiler\nc++: not found')
    monkeypatch.setattr(kernels, '_build', broken)
    monkeypatch.setattr(kernels, '_state', dict(backend='auto', ops=None, error=None, tried=False))
    with pytest.warns(RuntimeWarning, match='c\\+\\+: not found.*torch ops'):
        assert kernels.native() is None
    with pytest.raises(RuntimeError, match='compiled kernels requested but unavailable'):
        backend('cpp')
    backend('torch')
    assert kernels.native() is None
    with pytest.raises(ValueError, match="expected one of"):
        backend('fast')


def test_compiled_integer_layernorm_equals_the_torch_route(backend):
    """FQ-ViT's integer LayerNorm: the compiled rows = int_layernorm_fake_quant, bit for bit,
    including rows the kernel hands back to the reference (a zero γ channel fails its bound)."""
    import copy

    from fqvit_det.integer.layernorm import CompiledIntLayerNorm, compile_integer_layernorms
    model, x = calibrated('fqvit_lis', 'cpu')
    inputs = {}
    hooks = [blk.norm1.register_forward_pre_hook(
        lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for i, blk in enumerate(model.blocks):
        norm = copy.deepcopy(blk.norm1)
        assert compile_integer_layernorms(norm) == 1 and type(norm) is CompiledIntLayerNorm
        xin = torch.cat([inputs[i], 50 * inputs[i][:1]])        # and some clamped PTF codes
        from fqvit_det.quantizers.ptf import layernorm_fake_quant_setup
        iq, oq = norm._integer_pair()
        assert layernorm_fake_quant_setup(xin, iq, norm.weight, norm.bias, oq) is not None
        with torch.no_grad():
            backend('torch')
            ref = norm(xin)
            backend('cpp')
            assert torch.equal(norm(xin), ref)
            # γ_c = 0 (real DeiT-Tiny LayerNorms have one): |a| = 0, the reference's literal
            # route (n = 31, M = 0), which the kernel computes itself
            norm.weight[3] = 0.0
            backend('torch')
            ref0 = norm(xin)
            backend('cpp')
            assert torch.equal(norm(xin), ref0)
            ops = kernels.native()
            _, ok, nbad = ops.int_layernorm(xin.reshape(-1, xin.shape[-1]).contiguous(),
                                            *norm._kernel_args(norm._integer_pair(), xin))
            assert bool(ok.all()) and nbad == 0
            norm.weight[3] = float('inf')                         # a bound fails: reference
            backend('torch')
            ref_inf = norm(xin)
            backend('cpp')
            assert torch.equal(norm(xin).nan_to_num(), ref_inf.nan_to_num())


@pytest.mark.parametrize('method', ['fqvit_lis', 'repq_w4a4', 'adalog_6', 'ptq4vit'])
def test_integer_model_is_the_same_with_and_without_the_compiled_kernels(backend, method):
    """The whole integer model (input quantization, GEMM epilogues, twin-uniform operands,
    integer LayerNorm, attention cores) gives the same logits either way, batch 1 and 4."""
    from fqvit_det.integer import to_integer
    from fqvit_det.integer.layernorm import CompiledIntLayerNorm
    model, x = calibrated(method, 'cpu')
    integer = to_integer(model)
    assert any(type(m) is CompiledIntLayerNorm for m in integer.modules()) == \
        method.startswith('fqvit')
    with torch.no_grad():
        for xb in (x[:1], x[:4]):
            backend('torch')
            ref = integer(xb)
            backend('cpp')
            assert torch.equal(integer(xb), ref)


def test_compiled_ptf_fake_quant_equals_the_torch_route(backend):
    """Residual-stream PTF fake quantization: values, clamping, −0.0 → +0.0 and ±inf → NaN as the
    torch route; a quantizer converted by ``compile_ptf_quantizers`` keeps its state."""
    import copy

    from fqvit_det.integer.layernorm import CompiledPTFQuantizer, compile_ptf_quantizers
    model, x = calibrated('fqvit_lis', 'cpu')
    q = copy.deepcopy(model.blocks[0].attn_residual_quantizer)
    assert compile_ptf_quantizers(q) == 1 and type(q) is CompiledPTFQuantizer
    C = q.alpha.numel()
    g = torch.Generator().manual_seed(0)
    xin = torch.randn(50, C, generator=g) * 4
    xin[0, :4] = torch.tensor([-1e-30, float('inf'), float('-inf'), 1e6])
    with torch.no_grad():
        backend('torch')
        ref = q(xin)
        backend('cpp')
        assert q._kernel_args() is not None
        out = q(xin)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(torch.signbit(out[~out.isnan()]), torch.signbit(ref[~ref.isnan()]))


def test_add_fake_quant_is_the_sum_then_the_quantizer(backend):
    """The residual sum and its PTF quantizer in one pass: the bits of ``q(a + b)`` (clamping,
    −0.0, ±inf, NaN included), with the torch route where the kernel does not apply."""
    import copy

    from fqvit_det.integer.layernorm import compile_ptf_quantizers
    model, _ = calibrated('fqvit_lis', 'cpu')
    q = copy.deepcopy(model.blocks[0].attn_residual_quantizer)
    compile_ptf_quantizers(q)
    C = q.alpha.numel()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 40, C, generator=g) * 4
    a[0, 0, :5] = torch.tensor([-1e-30, float('inf'), float('-inf'), 1e6, 0.0])
    b[0, 0, :5] = torch.tensor([0.0, 1.0, 2.0, 1e6, -0.0])
    backend('cpp')
    with torch.no_grad():
        assert q._compiled(a) is not None
        ref, out = q(a + b), q.add_fake_quant(a, b)
        backend('torch')
        assert q._compiled(a) is None
        out_torch = q.add_fake_quant(a, b)
    for o in (out, out_torch):
        assert o.shape == a.shape and torch.equal(o.isnan(), ref.isnan())
        assert torch.equal(o.nan_to_num(), ref.nan_to_num())
        assert torch.equal(torch.signbit(o[~o.isnan()]), torch.signbit(ref[~ref.isnan()]))
    backend('cpp')
    ops = kernels.native()
    with pytest.raises(RuntimeError, match='add_fake_quant: a and b of the same shape'):
        ops.add_fake_quant(a[0], b[0, :3], *q._kernel_args())


def test_integer_layernorm_codes_are_the_next_linears_codes(backend):
    """``forward_codes``: the codes the integer Linear's own input quantization gives the norm's
    output values, for rows the kernel computes and rows it hands back to the reference."""
    import copy

    from fqvit_det.integer.layernorm import compile_integer_layernorms
    from fqvit_det.integer.linear import KERNELS
    model, x = calibrated('fqvit_lis', 'cpu')
    norm = copy.deepcopy(model.blocks[1].norm1)
    compile_integer_layernorms(norm)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():          # PTF values on the norm's input grid, some of them clamped
        xin = norm._integer_pair()[0].quantizer(torch.randn(2, 30, norm.weight.numel(),
                                                            generator=g) * 3)
    oq = norm.out_quantizer
    grids = [(oq.scale.reshape(()), int(oq.zero_point), 0, 255, torch.uint8),
             (oq.scale.reshape(()) * 1.37, int(oq.zero_point) - 128, -128, 127, torch.int8),
             (oq.scale.reshape(()), 3, 0, 15, torch.int32)]
    backend('cpp')
    ops = kernels.native()
    with torch.no_grad():
        for inf in (False, True):
            if inf:
                norm.weight[3] = 1e30          # the multiplier bound fails: the reference's rows
            args = norm._kernel_args(norm._integer_pair(), xin)
            *_, nbad = ops.int_layernorm_codes(xin.reshape(-1, xin.shape[-1]).contiguous(),
                                               *args, 1.0, 0, 0, 255, torch.uint8)
            assert (nbad > 0) == inf
            for grid in grids:
                backend('cpp')
                ours = norm.forward_codes(xin, grid)
                ref = KERNELS['quantize'](norm(xin), *grid)
                assert ours.dtype == grid[-1] and torch.equal(ours, ref)
                backend('torch')
                assert torch.equal(norm.forward_codes(xin, grid), ref)


@pytest.mark.parametrize('method', ['fqvit_lis', 'repq_w4a4'])
def test_integer_blocks_equal_the_unfused_blocks(backend, method):
    """The integer model's ``IntegerTimmBlock`` (residual sum + quantizer in one pass, integer
    LayerNorm → Linear codes) computes what ``QuantTimmBlock`` does with the same modules."""
    import pickle

    from fqvit_det.convert.timm_vit import QuantTimmBlock
    from fqvit_det.integer import to_integer
    from fqvit_det.integer.blocks import IntegerTimmBlock
    model, x = calibrated(method, 'cpu')
    integer = to_integer(model)
    blocks = list(integer.blocks)
    assert all(type(b) is IntegerTimmBlock for b in blocks)
    links = [b._code_links() for b in blocks]
    assert all(lin is not None for pair in links for lin in pair) == (method == 'fqvit_lis')
    with torch.no_grad():
        for be in ('cpp', 'torch'):
            backend(be)
            for xb in (x[:1], x[:3]):
                fused = integer(xb)
                for b in blocks:
                    b.__class__ = QuantTimmBlock
                try:
                    assert torch.equal(integer(xb), fused)
                finally:
                    for b in blocks:
                        b.__class__ = IntegerTimmBlock
    again = pickle.loads(pickle.dumps(integer))       # the block class pickles by name
    assert all(type(b) is IntegerTimmBlock for b in again.blocks)
    with torch.no_grad():
        assert torch.equal(again(x[:2]), integer(x[:2]))


def test_compiled_rational_gelu_is_the_torch_formula(backend):
    from fqvit_det.nn.exact import rational_gelu
    backend('cpp')
    ops = kernels.native()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100003, generator=g) * 4, torch.linspace(-12, 12, 4097),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 3e38, -3e38])])
    ref = rational_gelu(x)
    y = x.clone()
    assert ops.rational_gelu_(y) is not None
    assert torch.equal(y, ref)


def _threshold_probe(t: torch.Tensor, delta: float) -> torch.Tensor:
    """Probabilities whose u = x/Δ sit at, just below and just above every code threshold T,
    plus random values over 40 octaves, subnormals and the special values (odd length: the
    vector loop's scalar tail runs too)."""
    g = torch.Generator().manual_seed(3)
    near = torch.cat([t, torch.nextafter(t, torch.zeros(())), torch.nextafter(t, t * 2),
                      torch.nextafter(torch.nextafter(t, t * 2), t * 2)])
    rnd = torch.exp2(-40 * torch.rand(20000, generator=g)) * torch.rand(20000, generator=g)
    special = torch.tensor([0.0, -0.0, 1.0, 2.0, 1e-45, 1e-40, 3e38, float('inf'),
                            float('-inf'), float('nan'), -0.5, -1e-30])
    u = torch.cat([near, rnd, special])
    # x = u·Δ then x/Δ may not give u back: probe both u·Δ and its neighbours
    x = u * delta
    return torch.cat([x, torch.nextafter(x, torch.full_like(x, float('inf'))),
                      torch.nextafter(x, torch.zeros_like(x)), torch.rand(7, generator=g)])


# (0, 7) and (1, 8) have thresholds among the subnormals
@pytest.mark.parametrize('mode,bits,r,q', [(0, 4, 1.0, 1.0), (0, 7, 1.0, 1.0), (1, 4, 1.0, 1.0),
                                           (1, 3, 1.0, 1.0), (1, 8, 1.0, 1.0), (2, 4, 37.0, 5.0),
                                           (2, 6, 23.0, 4.0)])
def test_threshold_codes_equal_the_log2_codes(backend, mode, bits, r, q):
    """attention_pow2's log codes without log2 (``log_code_buckets`` → ``bucket_rows``): for
    every probability the same code as log2(x/Δ) through the code formula, vector and scalar
    loops alike, and the table alone (torch) says the same: code = #{T > u}."""
    from fqvit_det.integer.attention import log_code_buckets, search_thresholds16
    from fqvit_det.quantizers.log import log_code_of, log_code_thresholds
    backend('cpp')
    ops = kernels.native()
    code_of = log_code_of(mode, r, q)
    shift, base, inc, thr = log_code_buckets(code_of, bits)
    assert 23 - 8 <= shift <= 23
    t = log_code_thresholds(code_of, bits)
    for delta in (0.9, 0.0123, 1.0 / 3.0):
        x = _threshold_probe(t, delta)
        d = torch.tensor(delta, dtype=torch.float32)
        ref = ops.prob_codes(torch.log2(x / d), mode, r, q, 0.0, bits)
        for vector in (True, False):
            assert torch.equal(ops.bucket_codes(x, delta, base, inc, thr, shift, bits, vector,
                                                torch.empty(0)), ref)
        if bits <= 4:                    # the 16-threshold register search (AVX-512 CPUs)
            t16 = search_thresholds16(code_of, bits)
            assert t16.numel() == 16
            assert torch.equal(ops.bucket_codes(x, delta, base, inc, thr, shift, bits, True, t16),
                               ref)
        # the tables in torch: the bucket of u, base + inc·[u < thr], the zero code from 2^b
        b = (x / d).view(torch.int32)
        keep = (b >= 0) & (b <= 0x7F800000)           # NaN, negatives, −0: the kernel's guard
        u = (x / d)[keep]
        k = u.view(torch.int32).to(torch.int64) >> shift
        count = base[k].to(torch.int64) + inc[k].to(torch.int64) * (u < thr[k]).to(torch.int64)
        assert torch.equal(count, (u.unsqueeze(1) < t.unsqueeze(0)).sum(1))
        assert torch.equal(torch.where(count >= 2 ** bits, -1, count).to(torch.int32), ref[keep])


def test_compiled_attention_uses_threshold_codes_for_log_kinds():
    from fqvit_det.integer.attention import log_code_buckets
    from fqvit_det.quantizers.log import log_code_of
    for method, uses in (('repq_w4a4', True), ('adalog_6', True), ('ptq4vit', False)):
        model, _ = calibrated(method, 'cpu')
        ia = IntegerAttention(model.blocks[0].attn, method='simulation')
        assert (ia._code_buckets(*ia._code_mode()[:3])[0].numel() > 0) == uses
    # no tables (the kernel then calls log2) for a code that is not monotone in u, or where
    # thresholds crowd one bucket: 8-bit log2 has 130 of them among the subnormals
    assert log_code_buckets(lambda u: torch.round(torch.sin(40 * u) * 3 + 3), 2) is None
    assert log_code_buckets(log_code_of(0), 8) is None


@pytest.mark.parametrize('L', [5, 17, 32, 33, 129, 256, 257])
def test_operand_plane_lookup_routes_equal_indexing(backend, L):
    """The permute routes of the operand-plane lookup (≤ 32 entries; ≤ 257 entries with
    AVX-512 VBMI, index 256 patched from its mask) against plain indexing, with both ends of the
    table, a scalar tail, and the scalar route."""
    backend('cpp')
    ops = kernels.native()
    g = torch.Generator().manual_seed(L)
    table = torch.randint(-128, 128, (L,), generator=g, dtype=torch.int8)
    idx = torch.randint(0, L, (64 * 7 + 13,), generator=g, dtype=torch.int32)
    idx[:3] = torch.tensor([0, L - 1, L - 1], dtype=torch.int32)
    idx[100:140] = L - 1
    for vector in (True, False):
        assert torch.equal(ops.gather_table(table, idx, vector), table[idx.long()])
