"""AdaLog quantizer against references written from the formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from fqvit_det.quantizers import build_quantizer
from fqvit_det.quantizers.adalog import (GELU_SHIFT, AdaLogQuantizer, adalog_base_candidates,
                                         adalog_fake_quant)

R = 37


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def ref_lut(bits, r=R):
    grid = 2 ** (bits + 1) - 2
    return [round(2.0 ** (-j / r) * grid) / grid for j in range(r)]


def ref_codes(x, delta, q, bits, r=R, shift=0.0):
    """x_q = clamp(round(−log2((x + η)/Δ)·r/q), 0, 2^b − 1); −1 where x + η ≤ 0 or the code ≥ 2^b."""
    xs = x.float() + shift
    t = torch.round(-torch.log2(xs / delta) * r / q).flatten().tolist()
    out = []
    for v, tv in zip(xs.flatten().tolist(), t):
        out.append(-1 if (v <= 0 or tv >= 2 ** bits) else int(max(tv, 0)))
    return torch.tensor(out).reshape(x.shape)


def ref_dequant(codes, delta, q, bits, r=R):
    lut = ref_lut(bits, r)
    out = []
    for c in codes.flatten().tolist():
        out.append(0.0 if c < 0 else delta * 2.0 ** (-((c * q) // r)) * lut[(c * q) % r])
    return torch.tensor(out, dtype=torch.float64).reshape(codes.shape)


def ref_fq_vec(x, delta, q, bits, r=R):
    """Vectorised reference fake-quant (shifted domain, float64 LUT dequant) for the search tests."""
    xs = x.double()
    c = torch.round(-torch.log2(xs / delta) * r / q)
    zero = (xs <= 0) | (c >= 2 ** bits)
    c = torch.where(zero, torch.zeros_like(c), c.clamp(min=0)).long()
    lut = torch.tensor(ref_lut(bits, r), dtype=torch.float64)
    e = c * q
    val = delta * torch.exp2(-(e // r).double()) * lut[e % r]
    return torch.where(zero, torch.zeros_like(val), val)


def probe_values():
    g = torch.Generator().manual_seed(1)
    u = torch.exp2(-torch.rand(300, generator=g) * 60)
    return torch.cat([u, torch.tensor([0.0, -0.05, 1.0, 1.5, 0.5, 2.0 ** -10, 1e-35])])


# ------------------------------------------------------------------------------------------------
# formulas
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [2, 4, 6, 8])
@pytest.mark.parametrize('q', [10, 18, 37, 61, 137])
def test_codes_and_lut_dequant(bits, q):
    x = probe_values()
    m = AdaLogQuantizer(bits=bits)
    m.set_params(delta=0.75, q=q)
    codes = m.quantize(x)
    assert not codes.dtype.is_floating_point
    assert torch.equal(codes.long(), ref_codes(x, 0.75, q, bits))
    deq = m.dequantize(codes)
    assert torch.allclose(deq.double(), ref_dequant(codes, 0.75, q, bits), rtol=1e-6, atol=1e-37)
    exact = m.dequantize_exact(codes)
    ref_exact = torch.tensor([0.0 if c < 0 else 0.75 * 2.0 ** (-c * q / R) for c in codes.tolist()],
                             dtype=torch.float64)
    # float32: the exponent x_q·q/r (up to ~60) carries ~4e-6 absolute rounding; subnormals below 1e-37
    assert torch.allclose(exact.double(), ref_exact, rtol=1e-5, atol=1e-37)
    # LUT error: |T̂ − T| ≤ 1/(2G), T ≥ 2^(−(r−1)/r) > 1/2  →  relative error ≤ 1/G, G = 2^(b+1) − 2
    live = ref_exact > 1e-30
    rel = ((deq.double() - ref_exact).abs() / ref_exact)[live]
    assert rel.max() <= 1 / (2 ** (bits + 1) - 2) + 1e-6
    assert torch.equal(m.fake_quant(x), deq)


@pytest.mark.parametrize('bits', [2, 4, 6, 8])
def test_lut_buffer(bits):
    m = AdaLogQuantizer(bits=bits)
    assert m.lut.shape == (R,)
    assert torch.allclose(m.lut.double(), torch.tensor(ref_lut(bits), dtype=torch.float64), atol=1e-7)
    assert float(m.lut[0]) == 1.0


@pytest.mark.parametrize('bits', [2, 4, 6, 8])
def test_exact_zero_dequantizes_to_zero(bits):
    m = AdaLogQuantizer(bits=bits)
    m.set_params(q=37)
    x = torch.tensor([0.0, 0.0, 0.25])
    codes = m.quantize(x)
    assert codes[:2].eq(-1).all()
    out = m.fake_quant(x)
    assert out[0].item() == 0.0 and out[1].item() == 0.0 and out[2].item() == 0.25


def test_q_equal_r_is_log2():
    x = probe_values()
    m = AdaLogQuantizer(bits=4, q_init=37)
    m.set_params(delta=1.0)
    codes = m.quantize(x).long()
    t = torch.round(-torch.log2(x.float())).tolist()
    ref = [-1 if (v <= 0 or tv >= 16) else int(max(tv, 0)) for v, tv in zip(x.tolist(), t)]
    assert codes.tolist() == ref
    deq = m.dequantize(codes)
    assert deq.tolist() == [0.0 if c < 0 else 2.0 ** -c for c in ref]   # T̂[0] = 1: exact powers of 2


def test_base_candidates():
    c = adalog_base_candidates()
    assert c.tolist() == list(range(10, 138)) and c.numel() == 128


def test_fake_quant_broadcasts_candidates():
    g = torch.Generator().manual_seed(2)
    x = torch.softmax(torch.randn(4, 16, generator=g) * 3, -1)
    deltas = torch.tensor([1.0, 0.5, 0.8, 0.3]).reshape(4, 1, 1)
    qs = torch.tensor([37, 18, 25, 100]).reshape(4, 1, 1)
    out = adalog_fake_quant(x, deltas, qs, bits=4)
    assert out.shape == (4, 4, 16)
    m = AdaLogQuantizer(bits=4)
    for i in range(4):
        m.set_params(delta=float(deltas[i]), q=int(qs[i]))
        assert torch.equal(out[i], m.fake_quant(x))
        assert torch.allclose(out[i].double(), ref_fq_vec(x, float(deltas[i]), int(qs[i]), 4), rtol=1e-6)
    with pytest.raises(ValueError):
        adalog_fake_quant(x, 1.0, torch.tensor(18.5), bits=4)


# ------------------------------------------------------------------------------------------------
# post-GELU shift and bias folding
# ------------------------------------------------------------------------------------------------
def test_gelu_shift_and_bias_fold():
    g = torch.Generator().manual_seed(3)
    x = F.gelu(torch.randn(8, 24, generator=g) * 2)
    m = AdaLogQuantizer(bits=4, shift=GELU_SHIFT)
    m.set_params(delta=4.0, q=20)
    codes = m.quantize(x)
    assert torch.equal(codes.long(), ref_codes(x, 4.0, 20, 4, shift=GELU_SHIFT))
    shifted = m.dequantize_shifted(codes)
    assert torch.allclose(shifted.double(), ref_dequant(codes, 4.0, 20, 4), rtol=1e-6, atol=0)
    xhat = m.fake_quant(x)
    assert torch.allclose(xhat, shifted - GELU_SHIFT, atol=1e-7)
    assert torch.equal(xhat, m.dequantize(codes))
    m2 = AdaLogQuantizer(bits=4, shift=GELU_SHIFT, subtract_shift=False)
    m2.set_params(delta=4.0, q=20)
    assert torch.equal(m2.fake_quant(x), shifted)


# ------------------------------------------------------------------------------------------------
# finalize searches
# ------------------------------------------------------------------------------------------------
def test_finalize_post_softmax_picks_q_by_mse():
    g = torch.Generator().manual_seed(4)
    batches = [torch.softmax(torch.randn(2, 2, 8, 8, generator=g) * 3, -1) for _ in range(2)]
    m = AdaLogQuantizer(bits=4)
    m.set_mode('observe')
    for b in batches:
        assert torch.equal(m(b), b)
    m.finalize()
    assert float(m.delta) == 1.0
    flat = torch.cat([b.flatten() for b in batches]).double()
    errs = {q: float(((ref_fq_vec(flat, 1.0, q, 4) - flat) ** 2).mean()) for q in range(10, 138)}
    best = min(errs.values())
    assert errs[int(m.q)] == pytest.approx(best, rel=1e-9, abs=0)
    assert errs[int(m.q)] <= errs[37]


def test_finalize_post_gelu_searches_delta_and_q():
    g = torch.Generator().manual_seed(5)
    x = F.gelu(torch.randn(32, 32, generator=g) * 2)
    qs, factors = (12, 18, 25, 37, 50), (0.5, 0.75, 1.0)
    m = AdaLogQuantizer(bits=4, shift=GELU_SHIFT, q_candidates=qs, scale_factors=factors)
    m.set_mode('observe')
    m(x)
    m.finalize()
    xs = x.flatten().double() + GELU_SHIFT
    top = float((x.flatten().float() + GELU_SHIFT).max())
    errs = {(f, q): float(((ref_fq_vec(xs, top * f, q, 4) - xs) ** 2).mean()) for f in factors for q in qs}
    best = min(errs.values())
    chosen = [k for k in errs if math.isclose(top * k[0], float(m.delta), rel_tol=1e-6) and k[1] == int(m.q)]
    assert chosen and errs[chosen[0]] == pytest.approx(best, rel=1e-6, abs=0)
    m.set_mode('quant')
    assert ((m(x) - x) ** 2).mean() <= ((x - x.mean()) ** 2).mean()


def test_set_params_and_registry():
    m = build_quantizer(dict(type='AdaLogQuantizer', bits=6, q_init=20))
    assert isinstance(m, AdaLogQuantizer) and int(m.q) == 20
    assert not bool(m.calibrated)
    m.set_params(q=torch.tensor(30))
    assert int(m.q) == 30 and m.q.dtype == torch.int64 and bool(m.calibrated)
    m.set_params(delta=0.5)
    assert float(m.delta) == 0.5 and int(m.q) == 30
    with pytest.raises(ValueError):
        m.set_params(q=0)
    with pytest.raises(RuntimeError):
        AdaLogQuantizer().finalize()


# ------------------------------------------------------------------------------------------------
# rows, state, determinism, errors
# ------------------------------------------------------------------------------------------------
def test_one_hot_and_constant_rows():
    p = torch.softmax(torch.tensor([[500.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), -1)
    m = AdaLogQuantizer(bits=4)
    m.set_params(q=37)
    assert m.quantize(p)[0].tolist() == [0, -1, -1, -1]
    assert m.fake_quant(p)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert m.fake_quant(p)[1].eq(0.25).all()
    m.set_params(q=18)                     # 0.25 = 2^-2 → code round(2·37/18) = 4 → 2^-(72/37)
    c = m.quantize(p[1:])
    assert c.eq(4).all()
    assert torch.allclose(m.fake_quant(p[1:]).double(), ref_dequant(c, 1.0, 18, 4), rtol=1e-6)


def calibrated_gelu(x):
    m = AdaLogQuantizer(bits=4, shift=GELU_SHIFT, q_candidates=(15, 30, 45), scale_factors=(0.5, 1.0))
    m.set_mode('observe')
    m(x)
    m.finalize()
    m.set_mode('quant')
    return m


def test_state_dict_roundtrip_safetensors_determinism(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(6)
    x = F.gelu(torch.randn(16, 16, generator=g) * 2)
    m = calibrated_gelu(x)
    out = m(x)
    fresh = AdaLogQuantizer(bits=4, shift=GELU_SHIFT)
    fresh.load_state_dict(m.state_dict())
    fresh.set_mode('quant')
    assert torch.equal(fresh(x), out)
    path = tmp_path / 'adalog.safetensors'
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    fresh2 = AdaLogQuantizer(bits=4, shift=GELU_SHIFT)
    fresh2.load_state_dict(load_file(str(path)))
    fresh2.set_mode('quant')
    assert torch.equal(fresh2(x), out)
    assert int(fresh2.q) == int(m.q) and float(fresh2.delta) == float(m.delta)
    assert torch.equal(calibrated_gelu(x)(x), out)


def test_nonfinite_observe_raises_with_name():
    m = AdaLogQuantizer(bits=4)
    m.qname = 'blocks.3.mlp.act_quant'
    m.set_mode('observe')
    with pytest.raises(ValueError, match='blocks.3.mlp.act_quant'):
        m(torch.tensor([0.1, float('nan')]))


def test_reset_forgets_samples():
    m = AdaLogQuantizer(bits=4, q_candidates=(20, 37))
    m.set_mode('observe')
    m(torch.softmax(torch.randn(4, 8), -1))
    assert m.num_observed == 1
    m.finalize()
    m.reset()
    assert not bool(m.calibrated) and m.num_observed == 0
    with pytest.raises(RuntimeError):
        m.finalize()
