"""Integer attention kernels: dyadic requantization, QKᵀ int8 GEMM, P·V on power-of-two codes,
and ``IntegerAttention`` against the simulated attention of calibrated tiny ViTs."""
import json
import math
from fractions import Fraction

import pytest
import torch

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.integer.attention import (IntegerAttention, adalog_tables, apply_dyadic,
                                         dyadic_multiplier, int8_bmm, int_qk_matmul,
                                         log_sqrt2_tables, pow2_matmul, requantize,
                                         rounding_shift, split_mantissas, twin_softmax_tables)
from fqvit_det.presets import make_spec
from fqvit_det.quantizers.adalog import adalog_dequantize
from fqvit_det.quantizers.base import Quantizer
from fqvit_det.quantizers.log import log_sqrt2_dequantize
from fqvit_det.quantizers.twin import twin_softmax_decode

from ..helpers import images, tiny_vit


def exact_round(num: Fraction, mode: str) -> int:
    fl = math.floor(num)
    rem = num - fl
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and (mode == 'half_up' or fl % 2 == 1)):
        return fl + 1
    return fl


# --- dyadic -------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [8, 16, 31])
def test_dyadic_multiplier_range_and_bound(bits):
    m = torch.tensor([1e-9, 3e-4, 0.1, 0.3, 0.5, 1.0, 1 - 1e-12, 7.3, 2.0 ** 40], dtype=torch.float64)
    M, N = dyadic_multiplier(m, bits)
    assert bool(((M >= 2 ** (bits - 1)) & (M < 2 ** bits)).all())
    for mi, Mi, Ni in zip(m.tolist(), M.tolist(), N.tolist()):
        err = abs(Fraction(Mi) * Fraction(2) ** -Ni - Fraction(mi))
        assert err <= Fraction(mi) * Fraction(2) ** -bits
    with pytest.raises(ValueError, match='positive'):
        dyadic_multiplier(torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize('rounding', ['half_even', 'half_up'])
def test_rounding_shift_matches_exact_rounding(rounding):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2 ** 40, 2 ** 40, (400,), generator=g)
    n = torch.randint(0, 20, (400,), generator=g)
    x[:100] = (torch.randint(-1000, 1000, (100,), generator=g) * 2 + 1) << (n[:100] - 1).clamp(min=0)
    y = rounding_shift(x, n, rounding)
    for xi, ni, yi in zip(x.tolist(), n.tolist(), y.tolist()):
        assert yi == exact_round(Fraction(xi, 2 ** ni), rounding)
    assert torch.equal(rounding_shift(x, -3), x * 8)


def test_apply_dyadic_is_within_one_code_and_exact_off_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2 ** 24, 2 ** 24, (3000,), generator=g)
    for m in (0.3, 1.7e-3, 0.0123, 5.5):
        M, N = dyadic_multiplier(m)
        y = apply_dyadic(x, M, N)
        for xi, yi in zip(x.tolist(), y.tolist()):
            exact = Fraction(xi) * Fraction(m)
            assert abs(yi - exact_round(exact, 'half_even')) <= 1
            # M·2^−N is within m·2^−31 of m: away from ties the rounding is the exact one
            frac = exact - math.floor(exact)
            if abs(frac - Fraction(1, 2)) > abs(Fraction(xi)) * Fraction(m) * Fraction(2) ** -30:
                assert yi == exact_round(exact, 'half_even')
    with pytest.raises(OverflowError):
        apply_dyadic(torch.tensor([2 ** 40]), 2 ** 30, 3)


@pytest.mark.parametrize('method', ['dyadic', 'float'])
def test_requantize_two_terms_per_channel(method):
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-300, 300, (50, 4), generator=g)
    b = torch.randint(-300, 300, (50, 4), generator=g)
    ma = torch.tensor([0.5, 0.031, 1.25, 0.007], dtype=torch.float64)
    mb = torch.tensor([0.11, 0.2, 0.013, 2.0], dtype=torch.float64)
    y = requantize([a, b], [ma, mb], torch.tensor(10.0), 0, 255, method=method)
    exact = torch.tensor([[exact_round(Fraction(ai) * Fraction(mai) + Fraction(bi) * Fraction(mbi),
                                       'half_even')
                           for ai, bi, mai, mbi in zip(ra, rb, ma.tolist(), mb.tolist())]
                          for ra, rb in zip(a.tolist(), b.tolist())])
    ref = (exact + 10).clamp(0, 255)
    assert y.dtype == torch.int32
    assert int((y - ref).abs().max()) <= 1
    assert float((y != ref).float().mean()) < 0.02
    with pytest.raises(ValueError, match='zero point'):
        requantize(a, 0.5, torch.tensor(0.5), 0, 255)


# --- GEMMs --------------------------------------------------------------------------------------
def test_int8_bmm_is_exact(device):
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (2, 3, 19, 21), generator=g, dtype=torch.int8).to(device)
    b = torch.randint(-128, 128, (2, 3, 21, 5), generator=g, dtype=torch.int8).to(device)
    out = int8_bmm(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out.cpu().long(), a.cpu().long() @ b.cpu().long())


@pytest.mark.parametrize('q_range,zq,zk', [((0, 255), 100.0, 100.0),       # FQ-ViT uint8, one z
                                           ((0, 255), 'head', 7.0),       # AdaLog per-head z
                                           ((-128, 127), 0.0, 0.0),       # PTQ4ViT signed
                                           ((0, 15), 5.0, -40.0)])        # 4-bit, RepQ-style z
def test_int_qk_matmul_is_exact(device, q_range, zq, zk):
    g = torch.Generator().manual_seed(4)
    lo, hi = q_range
    q = torch.randint(lo, hi + 1, (2, 3, 17, 16), generator=g).to(device)
    k = torch.randint(lo, hi + 1, (2, 3, 17, 16), generator=g).to(device)
    if zq == 'head':
        zq = torch.tensor([3.0, -20.0, 300.0], device=device).view(1, 3, 1, 1)
    zq_t = torch.as_tensor(zq, device=device)
    acc = int_qk_matmul(q, k, zq_t, torch.tensor(zk, device=device), q_range, q_range)
    ref = (q.long() - zq_t.long()) @ (k.long() - int(zk)).transpose(-2, -1)
    assert torch.equal(acc.long(), ref)


def _pow2_reference(index, classes, v, zv):
    """Σ_classes factor·Σ_j mant_j·2^−shift_j·(v_j − z) in float64 from the tables."""
    out = 0
    for mant, shift, factor in classes:
        w = mant[index.long()].double() * torch.exp2(-shift[index.long()].double())
        out = out + factor * (w @ (v.double() - zv))
    return out


@pytest.mark.parametrize('kind', ['log_sqrt2_4', 'log_sqrt2_6', 'adalog_4', 'adalog_8', 'twin_4',
                                  'twin_8'])
def test_pow2_matmul_matches_the_dequantized_product(kind):
    g = torch.Generator().manual_seed(5)
    name, bits = kind.rsplit('_', 1)
    bits = int(bits)
    if name == 'log_sqrt2':
        classes = log_sqrt2_tables(bits)
        codes = torch.randint(-1, 2 ** bits, (2, 3, 12, 12), generator=g)
        deq = log_sqrt2_dequantize(codes, 1.0)
    elif name == 'adalog':
        mant, shift, factor = adalog_tables(bits, 29, 37)
        classes = split_mantissas(mant, shift, factor)
        codes = torch.randint(-1, 2 ** bits, (2, 3, 12, 12), generator=g)
        deq = adalog_dequantize(codes, 1.0, 29, 37, bits=bits)
    else:
        mant, shift, factor = twin_softmax_tables(bits, 9)
        classes = split_mantissas(mant, shift, factor)
        codes = torch.randint(0, 2 ** bits, (2, 3, 12, 12), generator=g)
        deq = twin_softmax_decode(codes, 9, bits)
    v = torch.randint(0, 256, (2, 3, 12, 8), generator=g)
    index = codes + 1
    total = 0
    for mant, shift, factor in classes:
        acc, frac = pow2_matmul(index, mant, shift, v, 90.0, (0, 255))
        # the accumulator itself is exact: compare with an int64 reference
        w = torch.where(mant[index] > 0, mant[index] << (frac - shift[index]).clamp(min=0),
                        torch.zeros_like(mant[index]))
        if acc.dtype == torch.int64 and bool(((frac - shift[index]) >= 0).all()):
            assert torch.equal(acc, w @ (v.long() - 90))
        total = total + factor * acc.double() * 2.0 ** -frac
    ref = _pow2_reference(index, classes, v, 90.0)
    assert torch.allclose(total, ref, rtol=1e-12, atol=1e-12)
    # and the tables reproduce the quantizers' own dequantization (float32)
    assert torch.allclose(total, deq.double() @ (v.double() - 90), rtol=1e-5, atol=1e-4)


# --- IntegerAttention vs the simulation ---------------------------------------------------------
METHODS = {
    'fqvit_lis': ('fqvit', 8, 8, dict(attn_bits=4)),
    'fqvit_lis3': ('fqvit', 8, 8, dict(attn_bits=3)),
    'fqvit_lis5': ('fqvit', 8, 8, dict(attn_bits=5)),
    'fqvit_lis6': ('fqvit', 8, 8, dict(attn_bits=6)),
    'fqvit_uniform': ('fqvit', 8, 8, dict(attn_bits=8, lis=False)),
    'repq_w4a4': ('repq', 4, 4, {}),
    # the post-GELU AdaLog search (Δ × q) is slow and outside the attention: uniform fc2 input
    'adalog_6': ('adalog', 6, 6, dict(search=None, roles=dict(
        fc2_input=dict(type='UniformQuantizer', bits=6)))),
    'ptq4vit': ('ptq4vit', 8, 8, dict(search=None)),
}


_CALIBRATED = {}


def calibrated(method, device, seed=0):
    """A calibrated tiny ViT (cached per method and device; tests only read it)."""
    key = (method, str(device), seed)
    if key not in _CALIBRATED:
        _CALIBRATED[key] = _calibrate(method, device, seed)
    return _CALIBRATED[key]


def _calibrate(method, device, seed):
    name, w, a, kw = METHODS[method]
    model = tiny_vit(seed).to(device)
    spec = make_spec(name, w, a, **kw)
    quantize_model(model, spec)
    x = images(model, 8).to(device)
    CalibrationRunner(model, spec, progress=False).run([x[:4], x[4:]])
    return model, x


def capture_attention(model, x):
    """qkv outputs, probability-quantizer inputs and proj inputs (simulated) of every block."""
    caps, hooks = [], []
    for blk in model.blocks:
        cap = {}
        caps.append(cap)
        hooks.append(blk.attn.qkv.register_forward_hook(
            lambda m, i, o, cap=cap: cap.__setitem__('qkv', o)))
        hooks.append(blk.attn.aq.probs.register_forward_pre_hook(
            lambda m, i, cap=cap: cap.__setitem__('probs_in', i[0])))
        hooks.append(blk.attn.proj.register_forward_pre_hook(
            lambda m, i, cap=cap: cap.__setitem__('proj_in', i[0])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return caps


@pytest.mark.parametrize('method', list(METHODS))
def test_integer_attention_matches_the_simulation(device, method):
    """Stage by stage: the probability codes, and P·V + requantization on the simulation's own
    probability codes (≤ 1 code: one rounding of an exact accumulator vs float32); end to end a
    flipped logit / probability code (float32 tie) can move an output by more than one code, so
    there only the share of differing codes is bounded."""
    model, x = calibrated(method, device)
    caps = capture_attention(model, x[:4])
    for blk, cap in zip(model.blocks, caps):
        ia = IntegerAttention(blk.attn)
        qkv = cap['qkv']
        qkv_q = blk.attn.qkv.out_quantizer
        if qkv_q is not None:
            codes_in = qkv_q.quantize(qkv)              # FQ-ViT: the codes the qkv GEMM emits
            assert torch.equal(ia(codes_in), ia(qkv_q(qkv)))   # codes in = dequantized values in
            qkv = codes_in
        q, k, v = ia.split(qkv)
        oq = blk.attn.proj.in_quantizer
        ref = oq.quantize(cap['proj_in'])
        sim_p = blk.attn.aq.probs.quantize(cap['probs_in'])
        ours_p = ia.probability_codes(q, k)
        assert float((ours_p != sim_p).float().mean()) <= 0.005
        pv = ia.pv_codes(sim_p, v)
        assert pv.dtype == torch.int32 and pv.shape == ref.shape
        diff = (pv - ref).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.005
        codes = ia(qkv)
        assert float((codes != ref).float().mean()) <= 0.005
        assert torch.equal(ia(qkv, dequantize=True), oq.dequantize(codes))


def test_integer_attention_lis_logit_codes_within_one_code(device):
    from fqvit_det.integer.attention import qk_logit_codes
    model, x = calibrated('fqvit_lis', device)
    caps = capture_attention(model, x[:4])
    attn = model.blocks[0].attn
    ia = IntegerAttention(attn)
    qq = attn.qkv.out_quantizer
    q, k, _ = ia.split(qq.quantize(caps[0]['qkv']))
    acc = int_qk_matmul(q, k, qq.zero_point, qq.zero_point, (qq.qmin, qq.qmax), (qq.qmin, qq.qmax))
    lq = attn.aq.probs.logit_quant
    ours = qk_logit_codes(acc, qq.scale, qq.scale, attn.scale, lq)
    sim = lq.quantize((qq.dequantize(q) @ qq.dequantize(k).transpose(-2, -1)) * attn.scale)
    diff = (ours - sim).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.005


def test_integer_attention_refuses_unconverted_or_unquantized_attention():
    model = tiny_vit()
    with pytest.raises(TypeError, match='quantize_model'):
        IntegerAttention(model.blocks[0].attn)
    spec = make_spec('repq', 8, 8, roles=dict(attn_probs=None))
    quantize_model(model, spec)
    with pytest.raises(NotImplementedError, match='probabilities are not quantized'):
        IntegerAttention(model.blocks[0].attn)


@pytest.mark.parametrize('method,requant', [('fqvit_lis', 'dyadic'), ('fqvit_lis', 'simulation'),
                                            ('fqvit_lis5', 'simulation'),
                                            ('fqvit_lis6', 'simulation')])
def test_lis_fast_path_equals_the_generic_integer_path(device, method, requant):
    """5-bit codes: operand groups up to 2^31; 6-bit codes would overflow the fast path's int64
    group sums, so it declines them and the generic path runs."""
    model, x = calibrated(method, device)
    caps = capture_attention(model, x[:4])
    for blk, cap in zip(model.blocks, caps):
        fast = IntegerAttention(blk.attn, method=requant)
        slow = IntegerAttention(blk.attn, fast=False, method=requant)
        codes = blk.attn.qkv.out_quantizer.quantize(cap['qkv'])
        applies = fast._lis_fast(*fast.split(codes)) is not None
        assert applies == (method != 'fqvit_lis6')
        a, b = fast(codes), slow(codes)
        assert int((a - b).abs().max()) <= 1 and float((a != b).float().mean()) <= 0.001


@pytest.mark.parametrize('method', ['fqvit_lis', 'repq_w4a4', 'adalog_6'])
def test_integer_attention_state_round_trip(method):
    model, x = calibrated(method, 'cpu')
    cap = capture_attention(model, x[:2])[0]
    ia = IntegerAttention(model.blocks[0].attn)
    state = ia.state_dict()
    ptrs = [t.data_ptr() for t in state.values() if t.numel()]
    assert len(ptrs) == len(set(ptrs))                  # no shared storage (safetensors-ready)
    assert not any(isinstance(m, Quantizer) for m in ia.modules())   # its own constants only
    clone = IntegerAttention(config=json.loads(json.dumps(ia.config())))
    clone.load_state_dict(state, strict=True)
    qkv = cap['qkv']
    qkv_q = model.blocks[0].attn.qkv.out_quantizer
    if qkv_q is not None:
        qkv = qkv_q.quantize(qkv)
    assert torch.equal(clone(qkv), ia(qkv))


@pytest.mark.parametrize('method', ['repq_w4a4', 'fqvit_lis'])
def test_integer_attention_chunking_does_not_change_codes(method):
    model, x = calibrated(method, 'cpu')
    cap = capture_attention(model, x[:4])[1]
    ia = IntegerAttention(model.blocks[1].attn)
    qkv = cap['qkv']
    qkv_q = model.blocks[1].attn.qkv.out_quantizer
    if qkv_q is not None:
        qkv = qkv_q.quantize(qkv)
    ia.chunk_elems = 1                    # one image (generic) / one head matrix (fast) per chunk
    small = ia(qkv)
    ia.chunk_elems = 1 << 40
    assert torch.equal(small, ia(qkv))


def test_to_int8_offsets_any_integer_codes():
    from fqvit_det.integer.attention import to_int8
    codes = torch.arange(256, dtype=torch.int32).view(16, 16).t()      # non-contiguous
    for c in (codes, codes.to(torch.uint8), codes.to(torch.int16)):
        out = to_int8(c, 128)
        assert out.dtype == torch.int8 and out.is_contiguous()
        assert torch.equal(out.long(), codes.long() - 128)
