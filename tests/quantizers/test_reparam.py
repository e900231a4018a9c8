"""RepQ-ViT post-LayerNorm scale reparameterization."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqvit_det.quantizers import UniformQuantizer
from fqvit_det.quantizers.base import MIN_SCALE
from fqvit_det.quantizers.reparam import repq_reparameterize, repq_reparameterize_modules

QMAX = 255  # 8-bit unsigned asymmetric


def ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-6)


def channel_params(y):
    """Per-channel asymmetric 8-bit (Δ_c, z_c) of y [..., C], range widened to include 0."""
    flat = y.reshape(-1, y.shape[-1]).double()
    mn = flat.min(0).values.clamp(max=0)
    mx = flat.max(0).values.clamp(min=0)
    scale = ((mx - mn) / QMAX).clamp(min=MIN_SCALE)
    zp = (-torch.round(mn / scale)).clamp(0, QMAX)
    return scale.float(), zp.float()


def codes(y, scale, zp):
    return torch.clamp(torch.round(y / scale) + zp, 0, QMAX)


def setup(C=24, out=(10,), seed=0, dead=(), bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, C, generator=g) * 2 + 0.5
    gamma = torch.exp(torch.randn(C, generator=g))          # channel magnitudes vary ~10x
    beta = torch.randn(C, generator=g)
    for c in dead:
        gamma[c] = 0.0
        beta[c] = 0.0
    lins = [(torch.randn(o, C, generator=g) / C ** 0.5,
             torch.randn(o, generator=g) if bias else None) for o in out]
    scale, zp = channel_params(ln(x, gamma, beta))
    return x, gamma, beta, lins, scale, zp


def linear(y, w, b):
    return F.linear(y.double(), w.double(), None if b is None else b.double())


def assert_lossless(x, gamma, beta, w, b, new):
    g2, b2, w2, bias2 = new
    ref = linear(ln(x.double(), gamma.double(), beta.double()), w, b)
    got = linear(ln(x.float(), g2, b2), w2, bias2)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, float(err)


def test_formulas_and_lossless_single_linear():
    x, gamma, beta, [(w, b)], scale, zp = setup()
    g2, b2, w2, bias2, t_scale, t_zp = repq_reparameterize(gamma, beta, w, b, scale, zp)
    # reference values straight from the formulas
    s64, z64 = scale.double(), zp.double()
    ts = s64.mean()
    tz = torch.round(z64.mean())
    r = s64 / ts
    bb = (-z64 * s64) / r - (-tz * ts)
    torch.testing.assert_close(t_scale, ts.float())
    assert float(t_zp) == float(tz) and float(t_zp).is_integer()
    torch.testing.assert_close(g2.double(), gamma.double() / r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b2.double(), beta.double() / r - bb, rtol=1e-6, atol=1e-6)
    w_ref = w.double() * r[None, :]
    torch.testing.assert_close(w2.double(), w_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias2.double(), b.double() + w_ref @ bb, rtol=1e-6, atol=1e-6)
    assert g2.dtype == gamma.dtype and w2.dtype == w.dtype
    assert_lossless(x, gamma, beta, w, b, (g2, b2, w2, bias2))


def test_layerwise_codes_match_channelwise_codes():
    x, gamma, beta, [(w, b)], scale, zp = setup(C=32, seed=1)
    y = ln(x.double(), gamma.double(), beta.double())
    g2, b2, _, _, t_scale, t_zp = repq_reparameterize(gamma, beta, w, b, scale, zp)
    y2 = ln(x.double(), g2.double(), b2.double())
    old = codes(y, scale.double(), zp.double())
    new = codes(y2, t_scale.double(), t_zp.double())
    diff = (old - new).abs()
    assert diff.max() <= 1                                   # only float ties at .5 may differ
    assert (diff > 0).double().mean() < 1e-3
    # dequantized values agree channel by channel: ŷ_c = r_c (ŷ'_c + b_c)
    r = scale.double() / t_scale.double()
    bb = (t_zp.double() - zp.double()) * t_scale.double()
    deq_old = (old - zp.double()) * scale.double()
    deq_new = (new - t_zp.double()) * t_scale.double()
    same = diff == 0
    torch.testing.assert_close((r * (deq_new + bb))[same], deq_old[same], rtol=1e-9, atol=1e-9)


def test_several_linears_and_bias_none():
    x, gamma, beta, lins, scale, zp = setup(out=(9, 5, 7), seed=2)
    lins[1] = (lins[1][0], None)
    ws, bs = [w for w, _ in lins], [b for _, b in lins]
    ws_before = [w.clone() for w in ws]
    g2, b2, w2s, b2s, _, _ = repq_reparameterize(gamma, beta, ws, bs, scale, zp)
    assert isinstance(w2s, list) and len(w2s) == 3 and len(b2s) == 3
    assert b2s[1] is not None and b2s[1].shape == (5,)
    for (w, b), w2, bias2 in zip(lins, w2s, b2s):
        assert_lossless(x, gamma, beta, w, b, (g2, b2, w2, bias2))
    assert all(torch.equal(a, c) for a, c in zip(ws, ws_before))   # inputs untouched
    # bias=None for a single Linear too, and a list of all-None biases
    x, gamma, beta, [(w, _)], scale, zp = setup(seed=3, bias=False)
    g2, b2, w2, bias2, _, _ = repq_reparameterize(gamma, beta, w, None, scale, zp)
    assert_lossless(x, gamma, beta, w, None, (g2, b2, w2, bias2))
    out = repq_reparameterize(gamma, beta, [w, w], None, scale, zp)
    assert len(out[3]) == 2


def test_zero_range_channel_stays_finite_and_exact():
    dead = (3, 10)
    x, gamma, beta, [(w, b)], scale, zp = setup(seed=4, dead=dead)
    assert all(float(scale[c]) == pytest.approx(MIN_SCALE) for c in dead)
    g2, b2, w2, bias2, t_scale, t_zp = repq_reparameterize(gamma, beta, w, b, scale, zp)
    for t in (g2, b2, w2, bias2, t_scale, t_zp):
        assert torch.isfinite(t).all()
    live = [c for c in range(24) if c not in dead]
    assert float(t_scale) == pytest.approx(float(scale[live].double().mean()), rel=1e-6)
    for c in dead:                                   # untouched: r_c = 1, b_c = 0
        assert float(g2[c]) == 0.0 and float(b2[c]) == 0.0
        assert torch.equal(w2[:, c], w[:, c])
    assert_lossless(x, gamma, beta, w, b, (g2, b2, w2, bias2))
    y2 = ln(x.double(), g2.double(), b2.double())
    deq = (codes(y2, t_scale.double(), t_zp.double()) - t_zp.double()) * t_scale.double()
    for c in dead:
        assert (deq[..., c] == 0).all()


def test_all_channels_degenerate_is_identity():
    C = 6
    scale = torch.full((C,), MIN_SCALE)
    zp = torch.zeros(C)
    gamma, beta = torch.zeros(C), torch.zeros(C)
    w, b = torch.randn(4, C), torch.randn(4)
    g2, b2, w2, bias2, t_scale, t_zp = repq_reparameterize(gamma, beta, w, b, scale, zp)
    assert torch.equal(g2, gamma) and torch.equal(b2, beta)
    assert torch.equal(w2, w) and torch.equal(bias2, b)
    assert torch.isfinite(t_scale) and float(t_zp) == 0.0


def test_norm_without_affine_and_conv1x1():
    x, gamma, beta, [(w, b)], scale, zp = setup(seed=5)
    ones, zeros = torch.ones_like(gamma), torch.zeros_like(beta)
    scale, zp = channel_params(ln(x, None, None))
    g2, b2, w2, bias2, _, _ = repq_reparameterize(None, None, w, b, scale, zp)
    assert_lossless(x, ones, zeros, w, b, (g2, b2, w2, bias2))
    gc, bc, wc, biasc, _, _ = repq_reparameterize(None, None, w[:, :, None, None], b, scale, zp)
    assert wc.shape == (10, 24, 1, 1)
    torch.testing.assert_close(wc[:, :, 0, 0], w2)
    torch.testing.assert_close(biasc, bias2)
    with pytest.raises(ValueError):
        repq_reparameterize(None, None, torch.randn(4, 24, 3, 3), None, scale, zp)
    with pytest.raises(ValueError):
        repq_reparameterize(gamma, beta, torch.randn(4, 23), None, scale, zp)


def test_invalid_scales_raise():
    C = 4
    w = torch.randn(2, C)
    with pytest.raises(ValueError):
        repq_reparameterize(torch.ones(C), torch.zeros(C), w, None,
                            torch.tensor([0.1, float('nan'), 0.1, 0.1]), torch.zeros(C))
    with pytest.raises(ValueError):
        repq_reparameterize(torch.ones(C), torch.zeros(C), w, None, torch.tensor([0.1, 0.0, 0.1, 0.1]),
                            torch.zeros(C))


def test_modules_in_place_with_uniform_quantizers():
    torch.manual_seed(6)
    C = 16
    norm = nn.LayerNorm(C)
    with torch.no_grad():
        norm.weight.copy_(torch.exp(torch.randn(C)))
        norm.bias.copy_(torch.randn(C))
        norm.weight[2] = 0.0
        norm.bias[2] = 0.0
    fc1, fc2 = nn.Linear(C, 8), nn.Linear(C, 6, bias=False)
    x = torch.randn(4, 9, C)
    with torch.no_grad():
        y = norm(x)
        ref1, ref2 = fc1(y), fc2(y)
    cw = UniformQuantizer(bits=8, ch_axis=-1)
    cw.set_mode('observe')
    cw(y)
    cw.finalize()
    cw.set_mode('quant')
    deq_cw = cw(y)
    t_scale, t_zp = repq_reparameterize_modules(norm, [fc1, fc2], cw.scale, cw.zero_point)
    assert fc2.bias is not None
    with torch.no_grad():
        y2 = norm(x)
        torch.testing.assert_close(fc1(y2), ref1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fc2(y2), ref2, rtol=1e-5, atol=1e-5)
    lw = UniformQuantizer(bits=8)
    lw.set_params(t_scale, t_zp)
    lw.set_mode('quant')
    # layer-wise quantization of the new output == channel-wise quantization of the old one
    r = cw.scale.double() / t_scale.double()
    bb = (t_zp.double() - cw.zero_point.double()) * t_scale.double()
    back = r * (lw(y2).double() + bb)
    close = (back - deq_cw.double()).abs() <= 1e-5 * deq_cw.abs().max()
    assert close.double().mean() > 0.999
    assert torch.isfinite(norm.weight).all() and torch.isfinite(norm.bias).all()


def test_float64_inputs_keep_dtype():
    x, gamma, beta, [(w, b)], scale, zp = setup(seed=7)
    out = repq_reparameterize(gamma.double(), beta.double(), w.double(), b.double(), scale, zp)
    assert all(t.dtype == torch.float64 for t in out[:4])
    assert out[4].dtype == torch.float32
