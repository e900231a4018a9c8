"""UniformQuantizer and observers against hand-written references (numpy, written from the formulas).

Formulas (FQ-ViT §3, with our documented fixes):
  asymmetric: Δ = (max − min)/(q_max − q_min), z = clamp(q_min − ⌊min/Δ⌉, q_min, q_max)
  symmetric:  Δ = max(|min|, |max|)/q_max (signed) or max/q_max (unsigned), z = 0
  the range is widened to contain 0; Δ ≥ float32 eps; codes = clamp(⌊x/Δ⌉ + z, q_min, q_max).
"""
import re

import numpy as np
import pytest
import torch

from fqvit_det.quantizers import MIN_SCALE, UniformQuantizer, build_observer

F32_EPS = np.float32(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def int_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def ref_params_1d(vals, bits, symmetric, signed):
    """Δ, z for one slice of values (float32 arithmetic, like the quantizer)."""
    qmin, qmax = int_range(bits, signed)
    mn = np.float32(min(float(vals.min()), 0.0))
    mx = np.float32(max(float(vals.max()), 0.0))
    if symmetric:
        amax = max(-mn, mx) if signed else mx
        scale = max(np.float32(amax) / np.float32(qmax), F32_EPS)
        return np.float32(scale), np.float32(0.0)
    scale = max(np.float32(mx - mn) / np.float32(qmax - qmin), F32_EPS)
    scale = np.float32(scale)
    zp = np.float32(np.clip(qmin - np.round(mn / scale), qmin, qmax))
    return scale, zp


def ref_codes_1d(vals, scale, zp, bits, signed):
    qmin, qmax = int_range(bits, signed)
    return np.clip(np.round(vals.astype(np.float32) / scale) + zp, qmin, qmax)


def ref_uniform(x, bits, symmetric, signed, ch_axis):
    """Per-tensor or per-channel reference by an explicit loop over channels."""
    x = x.astype(np.float32)
    if ch_axis is None:
        s, z = ref_params_1d(x, bits, symmetric, signed)
        return np.array(s), np.array(z), ref_codes_1d(x, s, z, bits, signed)
    axis = ch_axis % x.ndim
    scales, zps, codes = [], [], np.empty_like(x)
    for c in range(x.shape[axis]):
        sl = np.take(x, c, axis=axis)
        s, z = ref_params_1d(sl, bits, symmetric, signed)
        scales.append(s)
        zps.append(z)
        idx = [slice(None)] * x.ndim
        idx[axis] = c
        codes[tuple(idx)] = ref_codes_1d(sl, s, z, bits, signed)
    return np.array(scales, np.float32), np.array(zps, np.float32), codes


def calibrate(q, *batches):
    q.set_mode('observe')
    for b in batches:
        q(b)
    q.finalize()
    q.set_mode('quant')
    return q


def ref_mse(x, lo, hi, bits, symmetric=False, signed=False):
    """MSE (float64) of quantizing x with the range [lo, hi], written from the formulas."""
    qmin, qmax = int_range(bits, signed)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        amax = max(-lo, hi) if signed else hi
        s, z = max(amax / qmax, float(F32_EPS)), 0.0
    else:
        s = max((hi - lo) / (qmax - qmin), float(F32_EPS))
        z = float(np.clip(qmin - np.round(lo / s), qmin, qmax))
    x = x.astype(np.float64)
    xh = (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s
    return float(np.mean((xh - x) ** 2))


# ----------------------------------------------------------------------------------------------
# UniformQuantizer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [2, 4, 6, 8])
@pytest.mark.parametrize('symmetric,signed', [(False, False), (False, True), (True, True),
                                              (True, False)])
@pytest.mark.parametrize('ch_axis', [None, 0, 1, -1])
def test_uniform_matches_reference(bits, symmetric, signed, ch_axis):
    g = torch.Generator().manual_seed(bits * 100 + (ch_axis or 7) + 10 * symmetric + 3 * signed)
    x = torch.randn(3, 5, 7, generator=g) * 2 + 0.3
    q = calibrate(UniformQuantizer(bits, symmetric=symmetric, signed=signed, ch_axis=ch_axis), x)
    s_ref, z_ref, c_ref = ref_uniform(x.numpy(), bits, symmetric, signed, ch_axis)
    assert q.scale.shape == s_ref.shape
    np.testing.assert_array_equal(q.scale.numpy(), s_ref)
    np.testing.assert_array_equal(q.zero_point.numpy(), z_ref)
    codes = q.quantize(x)
    assert not codes.dtype.is_floating_point
    np.testing.assert_array_equal(codes.numpy(), c_ref.astype(np.int64))
    qmin, qmax = int_range(bits, signed)
    assert codes.min() >= qmin and codes.max() <= qmax
    # fake_quant == dequantize(quantize), and dequantize is (q − z)·Δ
    deq = q.dequantize(codes)
    assert torch.equal(q.fake_quant(x), deq)
    assert torch.equal(q(x), deq)
    shape = [1] * 3
    if ch_axis is not None:
        shape[ch_axis % 3] = -1
    np.testing.assert_allclose(deq.numpy(), (c_ref - z_ref.reshape(shape)) * s_ref.reshape(shape),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('bits', [4, 8])
@pytest.mark.parametrize('ch_axis', [None, 0])
def test_symmetric_signed_max_weight_is_exact(bits, ch_axis):
    """Δ = amax/q_max (not FQ-ViT's amax/127.5): the largest-magnitude weight is representable."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 10, generator=g)
    w[2, 4] = 5.0   # positive extreme of row 2 / of the tensor
    w[4, 1] = -4.0  # negative extreme of row 4
    q = calibrate(UniformQuantizer(bits, symmetric=True, ch_axis=ch_axis), w)
    qmax = 2 ** (bits - 1) - 1
    codes = q.quantize(w)
    assert codes[2, 4] == qmax
    assert abs(float(q.fake_quant(w)[2, 4]) - 5.0) <= 1e-6 * 5
    if ch_axis == 0:
        assert codes[4, 1] == -qmax
        assert abs(float(q.fake_quant(w)[4, 1]) + 4.0) <= 1e-6 * 4
        # every row's extreme is exact
        amax_idx = w.abs().argmax(dim=1)
        ext = w.gather(1, amax_idx[:, None])
        np.testing.assert_allclose(q.fake_quant(w).gather(1, amax_idx[:, None]).numpy(),
                                   ext.numpy(), rtol=1e-6)
    else:
        np.testing.assert_allclose(float(q.scale), 5.0 / qmax, rtol=1e-7)


@pytest.mark.parametrize('symmetric', [False, True])
def test_all_zeros(symmetric):
    x = torch.zeros(4, 6)
    q = calibrate(UniformQuantizer(8, symmetric=symmetric, ch_axis=None), x)
    assert float(q.scale) == MIN_SCALE
    out = q(x)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(x))
    qc = calibrate(UniformQuantizer(8, symmetric=symmetric, ch_axis=1), x)
    assert torch.all(qc.scale == MIN_SCALE)
    assert torch.equal(qc(x), torch.zeros_like(x))


@pytest.mark.parametrize('value', [3.0, -2.0, 1e-3])
@pytest.mark.parametrize('symmetric', [False, True])
def test_constant_tensor(value, symmetric):
    x = torch.full((5, 4), value)
    q = calibrate(UniformQuantizer(8, symmetric=symmetric), x)
    s_ref, z_ref, c_ref = ref_uniform(x.numpy(), 8, symmetric, symmetric, None)
    assert float(q.scale) == float(s_ref) and float(q.zero_point) == float(z_ref)
    out = q(x)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), x.numpy(), rtol=1e-5)


def test_constant_channel_per_channel():
    x = torch.randn(4, 3, 5)
    x[:, 1] = 0.25
    x[:, 2] = 0.0
    q = calibrate(UniformQuantizer(8, ch_axis=1), x)
    out = q(x)
    assert torch.isfinite(out).all() and torch.all(q.scale > 0)
    np.testing.assert_allclose(out[:, 1].numpy(), 0.25, rtol=1e-5)
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))


def test_single_huge_outlier():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2000, generator=g)
    x[17] = 1e4
    q = calibrate(UniformQuantizer(8), x)
    s_ref, z_ref, c_ref = ref_uniform(x.numpy(), 8, False, False, None)
    np.testing.assert_array_equal(q.quantize(x).numpy(), c_ref)
    assert float(q.scale) == pytest.approx((1e4 - float(x.min())) / 255, rel=1e-6)
    out = q(x)
    assert abs(float(out[17]) - 1e4) <= float(q.scale) / 2 * 1.0001
    # the bulk collapses onto a few codes around z, but stays finite and within half a step
    assert torch.isfinite(out).all()
    assert float((out - x).abs().max()) <= float(q.scale) / 2 * 1.0001


def test_negative_only_inputs():
    x = -torch.rand(50, 3) * 4 - 0.5
    q = calibrate(UniformQuantizer(8), x)
    assert float(q.zero_point) == 255.0          # range widened to [min, 0]: max code is zero
    s_ref, z_ref, c_ref = ref_uniform(x.numpy(), 8, False, False, None)
    np.testing.assert_array_equal(q.quantize(x).numpy(), c_ref)
    assert float((q(x) - x).abs().max()) <= float(q.scale) / 2 * 1.0001
    qs = calibrate(UniformQuantizer(8, symmetric=True), x)
    assert int(qs.quantize(x).min()) == -127 and int(qs.quantize(x).max()) <= 0
    qu = calibrate(UniformQuantizer(8, symmetric=True, signed=False), x)  # unsigned symmetric
    assert float(qu.scale) == MIN_SCALE and torch.equal(qu(x), torch.zeros_like(x))


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), float('-inf')])
def test_non_finite_batch_raises_with_name(bad):
    q = UniformQuantizer(8, ch_axis=1)
    q.qname = 'backbone.blocks.3.attn.qact_logits'
    q.set_mode('observe')
    x = torch.randn(2, 4, 3)
    x[1, 2, 0] = bad
    with pytest.raises(ValueError, match=re.escape(q.qname)):
        q(x)


def test_quant_before_calibration_raises():
    q = UniformQuantizer(8)
    q.qname = 'neck.qact0'
    with pytest.raises(RuntimeError, match=re.escape('neck.qact0')):
        q.set_mode('quant')
    with pytest.raises(ValueError):
        q.set_mode('bogus')


@pytest.mark.parametrize('observer', ['MinMaxObserver', 'EMAObserver', 'PercentileObserver'])
@pytest.mark.parametrize('ch_axis', [None, 1])
def test_state_dict_round_trip(tmp_path, observer, ch_axis):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(2, 6, 4, generator=g) * (i + 1) for i in range(3)]
    cfg = dict(bits=6, symmetric=False, ch_axis=ch_axis, observer=dict(type=observer))
    q = calibrate(UniformQuantizer(**cfg), *xs)
    x = torch.randn(3, 6, 5, generator=g) * 3
    expected = q(x)

    fresh = UniformQuantizer(**cfg)
    if ch_axis is not None:
        assert fresh.scale.shape != q.scale.shape  # the fresh default is a scalar
    fresh.load_state_dict(q.state_dict())
    fresh.set_mode('quant')
    assert torch.equal(fresh(x), expected)
    assert torch.equal(fresh.quantize(x), q.quantize(x))

    path = str(tmp_path / 'q.safetensors')
    save_file(q.state_dict(), path)
    fresh2 = UniformQuantizer(**cfg)
    fresh2.load_state_dict(load_file(path))
    fresh2.set_mode('quant')
    assert torch.equal(fresh2(x), expected)


def test_determinism():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 8, generator=g) for _ in range(3)]
    a = calibrate(UniformQuantizer(4, ch_axis=1, observer=dict(type='OMSEObserver')), *xs)
    b = calibrate(UniformQuantizer(4, ch_axis=1, observer=dict(type='OMSEObserver')), *xs)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a(xs[0]), a(xs[0])) and torch.equal(a(xs[0]), b(xs[0]))


# ----------------------------------------------------------------------------------------------
# observers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('ch_axis', [None, 0, 1, -1])
def test_minmax_is_global_min_max(ch_axis):
    g = torch.Generator().manual_seed(21)
    xs = [torch.randn(3, 4, 5, generator=g) * (1 + i) + i for i in range(4)]
    obs = build_observer(dict(type='MinMaxObserver'), ch_axis=ch_axis)
    for x in xs:
        obs.update(x)
    mn, mx = obs.compute_range()
    allx = np.stack([x.numpy() for x in xs])  # (4, 3, 4, 5)
    if ch_axis is None:
        ref_mn, ref_mx = allx.min(), allx.max()
    else:
        axis = ch_axis % 3 + 1
        dims = tuple(d for d in range(4) if d != axis)
        ref_mn, ref_mx = allx.min(axis=dims), allx.max(axis=dims)
    np.testing.assert_array_equal(mn.numpy(), ref_mn)
    np.testing.assert_array_equal(mx.numpy(), ref_mx)


def test_no_data_raises():
    with pytest.raises(RuntimeError):
        build_observer('MinMaxObserver').compute_range()
    q = UniformQuantizer(8)
    with pytest.raises(RuntimeError):
        q.finalize()


@pytest.mark.parametrize('ch_axis', [None, 1])
def test_ema_recurrence(ch_axis):
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(2, 3, 4, generator=g) * (1 + 0.5 * i) for i in range(6)]
    obs = build_observer(dict(type='EMAObserver'), ch_axis=ch_axis)
    assert obs.sigma == 0.01
    for x in xs:
        obs.update(x)
    mn, mx = obs.compute_range()

    def batch_stats(x):
        a = x.numpy().astype(np.float64)
        if ch_axis is None:
            return a.min(), a.max()
        return a.min(axis=(0, 2)), a.max(axis=(0, 2))

    m_lo, m_hi = batch_stats(xs[0])  # the first batch initialises
    for x in xs[1:]:
        lo, hi = batch_stats(x)
        m_lo = m_lo + 0.01 * (lo - m_lo)
        m_hi = m_hi + 0.01 * (hi - m_hi)
    np.testing.assert_allclose(mn.numpy(), m_lo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mx.numpy(), m_hi, rtol=1e-5, atol=1e-6)


def test_percentile_tails_and_ema():
    """FQ-ViT Percentile: per batch torch.quantile(x, 1e-5) / torch.quantile(x, 1 − 1e-5)
    (linear interpolation), then the EMA with σ = 0.01, bit for bit."""
    tail = 1e-5
    torch.manual_seed(4)
    xs = []
    for i in range(3):
        x = torch.distributions.Laplace(0.0, 1.0).sample((4, 75000))  # 300k values per batch
        x[0, :5] = torch.tensor([400.0, -300.0, 250.0, 90.0, -120.0]) * (i + 1)  # rare outliers
        xs.append(x)
    obs = build_observer(dict(type='PercentileObserver'), ch_axis=None)
    assert obs.tail == tail and obs.sigma == 0.01
    los, his = [], []
    for x in xs:
        blo, bhi = obs.batch_range(x)
        assert torch.equal(blo, torch.quantile(x.reshape(-1), tail))
        assert torch.equal(bhi, torch.quantile(x.reshape(-1), 1 - tail))
        assert abs(float(bhi)) < 50 and abs(float(blo)) < 50  # outliers are clipped
        los.append(blo)
        his.append(bhi)
        obs.update(x)
    mn, mx = obs.compute_range()
    m_lo, m_hi = los[0], his[0]
    for lo, hi in zip(los[1:], his[1:]):
        m_lo = m_lo + 0.01 * (lo - m_lo)
        m_hi = m_hi + 0.01 * (hi - m_hi)
    assert torch.equal(mn, m_lo) and torch.equal(mx, m_hi)


def test_percentile_tail_does_not_collapse_to_min_max():
    """The issue's example: on 12,800 values q·(n − 1) = 0.128 for the 1e-5 tail, so the
    quantile interpolates between the two smallest values instead of being the minimum."""
    torch.manual_seed(0)
    x = torch.randn(100, 128)
    x[0, 0], x[5, 7] = -9.0, 8.0
    obs = build_observer(dict(type='PercentileObserver'), ch_axis=None)
    lo, hi = obs.batch_range(x)
    srt = x.reshape(-1).sort().values
    assert float(lo) > float(srt[0]) and float(hi) < float(srt[-1])
    assert torch.equal(lo, torch.lerp(srt[0], srt[1], torch.tensor(1e-5, dtype=torch.float32)
                                      * 12799 - 0))
    assert torch.equal(lo, torch.quantile(x.reshape(-1), 1e-5))
    assert torch.equal(hi, torch.quantile(x.reshape(-1), 1 - 1e-5))


def test_omse_picks_min_mse_factor_per_tensor():
    g = torch.Generator().manual_seed(6)
    lap = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(6)
    xs = [lap.sample((16, 32)) for _ in range(3)]
    xs[0][0, 0] = 25.0  # an outlier in an early batch widens the MinMax range
    bits = 4
    q = calibrate(UniformQuantizer(bits, observer=dict(type='OMSEObserver')), *xs)
    gmin = min(float(x.min()) for x in xs)
    gmax = max(float(x.max()) for x in xs)
    last = xs[-1].numpy()
    factors = [1.0 - 0.01 * i for i in range(90)]
    mses = np.array([ref_mse(last, gmin * f, gmax * f, bits) for f in factors])
    scales = np.array([(max(gmax * f, 0) - min(gmin * f, 0)) / 15 for f in factors])
    chosen = int(np.argmin(np.abs(scales - float(q.scale))))
    assert abs(scales[chosen] - float(q.scale)) <= 1e-6 * scales[chosen]
    assert mses[chosen] <= mses.min() * (1 + 1e-5)
    assert chosen > 0  # clipping actually helps on this data
    assert mses[chosen] < mses[0]


def test_omse_per_channel():
    torch.manual_seed(9)
    w = torch.distributions.Laplace(0.0, 1.0).sample((6, 40)) * torch.linspace(0.5, 3, 6)[:, None]
    w[1, 3] = 30.0
    bits = 3
    q = calibrate(UniformQuantizer(bits, symmetric=True, ch_axis=0,
                                   observer=dict(type='OMSEObserver')), w)
    qmax = 2 ** (bits - 1) - 1
    for c in range(6):
        row = w[c].numpy()
        lo, hi = float(row.min()), float(row.max())
        factors = [1.0 - 0.01 * i for i in range(90)]
        mses = np.array([ref_mse(row, lo * f, hi * f, bits, True, True) for f in factors])
        scales = np.array([max(-lo * f, hi * f) / qmax for f in factors])
        got = float(q.scale[c])
        chosen = int(np.argmin(np.abs(scales - got)))
        assert abs(scales[chosen] - got) <= 1e-6 * got
        assert mses[chosen] <= mses.min() * (1 + 1e-5)


@pytest.mark.parametrize('include_zero', [True, False])
def test_percentile_search_picks_best_of_three(include_zero):
    """RepQ-ViT: candidates (torch.quantile(x, 1 − p), torch.quantile(x, p)) for the three p, the
    least MSE wins (the first on ties), exactly."""
    from fqvit_det.quantizers.uniform import fake_quant_uniform_reference, scale_zero_point
    torch.manual_seed(12)
    lap = torch.distributions.Laplace(0.0, 1.0)
    xs = [lap.sample((200, 250)) for _ in range(2)]  # 100k pooled values
    xs[0][0, :20] = torch.linspace(15, 40, 20)
    bits = 4
    q = calibrate(UniformQuantizer(bits, observer=dict(type='PercentileSearchObserver'),
                                   include_zero=include_zero, clamp_zero_point=include_zero), *xs)
    pooled = torch.cat([x.reshape(-1) for x in xs])
    best = None
    for p in (0.999, 0.9999, 0.99999):
        lo, hi = torch.quantile(pooled, 1 - p), torch.quantile(pooled, p)
        s_, z_ = scale_zero_point(lo, hi, bits, False, False, include_zero, include_zero)
        err = ((fake_quant_uniform_reference(pooled, s_, z_, 0, 15) - pooled) ** 2).mean()
        if best is None or err < best[0]:
            best = (err, s_, z_)
    assert torch.equal(q.scale, best[1]) and torch.equal(q.zero_point, best[2])


def test_percentile_search_per_channel_rows_of_a_few_hundred():
    """On weight rows of a few hundred values the three candidates differ (a nearest-rank
    quantile would make all three the row's min / max)."""
    torch.manual_seed(2)
    w = torch.distributions.Laplace(0.0, 1.0).sample((4, 300))
    obs = build_observer(dict(type='PercentileSearchObserver'), ch_axis=0)
    obs.update(w)
    from fqvit_det.quantizers.observers import tail_quantiles
    pairs = tail_quantiles(w, (0.999, 0.9999, 0.99999))
    for p, (lo, hi) in zip((0.999, 0.9999, 0.99999), pairs):
        assert torch.equal(lo, torch.quantile(w, 1 - p, dim=-1))
        assert torch.equal(hi, torch.quantile(w, p, dim=-1))
        assert bool((hi < w.amax(-1)).all()) and bool((lo > w.amin(-1)).all())


def test_percentile_search_observer_pickles_with_its_pooled_samples():
    """A quantizer mid-calibration (samples pooled, not finalized) pickles and, unpickled,
    finalizes to the same scale: RepQ models can be saved with ``torch.save`` / pickle."""
    import pickle
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, 40, generator=g) for _ in range(2)]
    q = UniformQuantizer(4, ch_axis=0, observer=dict(type='PercentileSearchObserver'))
    q.set_mode('observe')
    q(xs[0])
    again = pickle.loads(pickle.dumps(q))
    for quant in (q, again):
        quant(xs[1])
        quant.finalize()
    assert torch.equal(again.scale, q.scale) and torch.equal(again.zero_point, q.zero_point)


@pytest.mark.parametrize('observer', ['MinMaxObserver', 'EMAObserver', 'PercentileObserver',
                                      'OMSEObserver', 'PercentileSearchObserver'])
def test_per_channel_aggregates_different_spatial_shapes(observer):
    """An FPN-style module called on (2,8,5,5) then (2,8,3,3) with ch_axis=1."""
    g = torch.Generator().manual_seed(31)
    a = torch.randn(2, 8, 5, 5, generator=g)
    b = torch.randn(2, 8, 3, 3, generator=g) * 2
    q = calibrate(UniformQuantizer(8, ch_axis=1, observer=dict(type=observer)), a, b)
    assert q.scale.shape == (8,) and q.zero_point.shape == (8,)
    assert torch.isfinite(q.scale).all() and torch.all(q.scale > 0)
    mn_a, mx_a = a.amin(dim=(0, 2, 3)), a.amax(dim=(0, 2, 3))
    mn_b, mx_b = b.amin(dim=(0, 2, 3)), b.amax(dim=(0, 2, 3))
    mn, mx = torch.minimum(mn_a, mn_b), torch.maximum(mx_a, mx_b)
    if observer == 'MinMaxObserver':
        s_ref = (torch.clamp(mx, min=0) - torch.clamp(mn, max=0)) / 255
        torch.testing.assert_close(q.scale, s_ref, rtol=1e-6, atol=0)
    elif observer in ('EMAObserver', 'PercentileObserver'):
        lo, hi = q.observer.compute_range()
        if observer == 'EMAObserver':
            torch.testing.assert_close(lo, mn_a + 0.01 * (mn_b - mn_a))
            torch.testing.assert_close(hi, mx_a + 0.01 * (mx_b - mx_a))
        assert torch.all(lo >= mn - 1e-6) and torch.all(hi <= mx + 1e-6)
    else:
        # searches only shrink the MinMax range
        s_ref = (torch.clamp(mx, min=0) - torch.clamp(mn, max=0)) / 255
        assert torch.all(q.scale <= s_ref * (1 + 1e-6))
    out_a, out_b = q(a), q(b)
    assert out_a.shape == a.shape and out_b.shape == b.shape
    assert torch.isfinite(out_a).all() and torch.isfinite(out_b).all()


def test_channel_count_change_raises():
    obs = build_observer('MinMaxObserver', ch_axis=1)
    obs.update(torch.randn(2, 4, 3))
    with pytest.raises(ValueError):
        obs.update(torch.randn(2, 5, 3))


# --- official range conventions ------------------------------------------------------------------
def _calibrated_uniform(x, **kw):
    q = UniformQuantizer(**kw)
    q.set_mode('observe')
    q(x)
    q.finalize()
    q.set_mode('quant')
    return q


def test_one_sided_range_repq_convention():
    """RepQ-ViT: Δ = (max − min)/(2^b − 1), z = round(−min/Δ) unclamped, codes clamp(⌊x/Δ⌉ + z)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 50, generator=g) * 3 + 2          # one-sided: [2, 5]
    q = _calibrated_uniform(x, bits=4, include_zero=False, clamp_zero_point=False)
    mn, mx = x.min(), x.max()
    delta = (mx - mn) / 15
    zp = torch.round(-mn / delta)
    assert torch.equal(q.scale, delta) and torch.equal(q.zero_point, zp)
    assert float(zp) < 0                                 # outside the code range, kept
    ref = (torch.clamp(torch.round(x / delta) + zp, 0, 15) - zp) * delta
    assert torch.equal(q(x), ref)
    assert float((q(x) - x).abs().max()) <= float(delta) / 2 * (1 + 1e-5)
    # the default (widened to include 0) uses a step about (5/3)× as large here
    wide = _calibrated_uniform(x, bits=4)
    assert float(wide.scale) > 1.5 * float(delta) and float(wide.zero_point) == 0


def test_fqvit_convention_keeps_range_and_clamps_zero_point():
    """FQ-ViT MinMax: Δ = (max − min)/255, z = clamp(−round(min/Δ), 0, 255), range not widened."""
    x = torch.linspace(1.0, 3.0, 100)
    q = _calibrated_uniform(x, bits=8, include_zero=False)
    delta = (x.max() - x.min()) / 255
    assert torch.equal(q.scale, delta)
    assert float(q.zero_point) == 0.0                   # −round(1/Δ) = −128 clamped to 0
    # per channel, the zero point of each channel is clamped on its own
    xc = torch.stack([torch.linspace(-1.0, 2.0, 50), torch.linspace(1.0, 3.0, 50)])
    qc = _calibrated_uniform(xc, bits=8, ch_axis=0, include_zero=False)
    d = (xc.amax(1) - xc.amin(1)) / 255
    assert torch.equal(qc.scale, d)
    assert torch.equal(qc.zero_point, torch.clamp(-torch.round(xc.amin(1) / d), 0, 255))


def test_symmetric_half_range_divisor():
    """FQ-ViT symmetric int8: Δ = max|w| / 127.5 (the largest positive weight clips by half a step)."""
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.25, -3.0, 1.0]])
    q = _calibrated_uniform(w, bits=8, symmetric=True, ch_axis=0, symmetric_divisor='half_range')
    assert torch.equal(q.scale, torch.tensor([2.0, 3.0]) / 127.5)
    q2 = _calibrated_uniform(w, bits=8, symmetric=True, ch_axis=0)
    assert torch.equal(q2.scale, torch.tensor([2.0, 3.0]) / 127)


@pytest.mark.parametrize('ch_axis', [None, -1])
def test_unclamped_zero_point_fast_path_bit_identical(ch_axis):
    from fqvit_det.quantizers.uniform import fake_quant_uniform_reference
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, 8, generator=g) + 4
    q = _calibrated_uniform(x, bits=4, ch_axis=ch_axis, include_zero=False,
                            clamp_zero_point=False)
    ref = fake_quant_uniform_reference(x, q.scale, q.zero_point, q.qmin, q.qmax, ch_axis)
    assert torch.equal(q(x), ref)
