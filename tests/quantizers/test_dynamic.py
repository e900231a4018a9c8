"""Dynamic per-token / per-group quantizers, the per-row softmax quantizer, the exact-pixel input
quantizer and the integer GEMM with per-row activation scales, against direct float references."""
import pickle

import pytest
import torch
import torch.nn.functional as F

from fqvit_det.quantizers import build_quantizer
from fqvit_det.quantizers.dynamic import (DynamicQuantizer, dynamic_int_linear,
                                          fold_pixel_normalization, int_matmul,
                                          symmetric_weight_codes)


def reference(x, bits, symmetric, signed, clip=1.0, group=None):
    """Per-row (last dim) or per-group fake quantization written from the formula, in float64."""
    x64 = x.double()
    rows = x64.reshape(-1, group) if group else x64.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    for i, r in enumerate(rows):
        if symmetric:
            amax = (r.abs().max() if signed else r.max().clamp(min=0)) * clip
            s = max(float(amax) / qmax, 1.1920928955078125e-07)
            z = 0.0
        else:
            lo, hi = min(float(r.min()), 0.0) * clip, max(float(r.max()), 0.0) * clip
            s = max((hi - lo) / (qmax - qmin), 1.1920928955078125e-07)
            z = min(max(qmin - round(lo / s), qmin), qmax)
        out[i] = (torch.clamp(torch.round(r / s) + z, qmin, qmax) - z) * s
    return out.reshape(x.shape)


def ready(cfg):
    q = build_quantizer(cfg)
    q.set_mode('observe')
    q(torch.zeros(2, 4))
    q.finalize()
    q.set_mode('quant')
    return q


def data(shape=(2, 7, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 20   # an outlier channel, as in DeiT's residual stream
    x[1, 2] *= 5      # a large token
    return x


@pytest.mark.parametrize('bits', [2, 4, 6, 8])
@pytest.mark.parametrize('symmetric', [False, True])
@pytest.mark.parametrize('group', [None, 16])
def test_fake_quant_matches_formula(bits, symmetric, group):
    cfg = dict(type='DynamicQuantizer', bits=bits, symmetric=symmetric)
    if group:
        cfg.update(granularity='group', group_size=group)
    q = ready(cfg)
    x = data()
    ref = reference(x, bits, symmetric, symmetric, group=group).float()
    out = q(x)
    # float32 vs float64 arithmetic: at most one step apart where x/Δ sits on a rounding tie
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    codes, scale, zp = q.quantize_dynamic(x)
    assert codes.dtype == torch.int32 and codes.shape == x.shape
    assert scale.shape == x.shape[:-1] + ((64 // group) if group else 1,)
    assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax
    assert torch.equal(q.dequantize_dynamic(codes, scale, zp), out)


def test_scales_are_per_token_and_clip_ratio_applies():
    q = ready(dict(type='DynamicQuantizer', bits=8, symmetric=True, clip_ratio=0.5))
    x = data()
    _, scale, _ = q.quantize_dynamic(x)
    assert torch.allclose(scale, x.abs().amax(-1, keepdim=True) * 0.5 / 127)
    assert torch.allclose(q(x), reference(x, 8, True, True, clip=0.5).float(), atol=1e-5)
    # a large token does not coarsen the other tokens' grids
    small = q(x)[0, 0] - x[0, 0]
    q2 = ready(dict(type='DynamicQuantizer', bits=8, symmetric=True, clip_ratio=0.5))
    assert torch.equal(q2(x[:1, :1])[0, 0] - x[0, 0], small)


def test_unsigned_symmetric_and_asymmetric_with_negative_rows():
    x = data()
    for sym, signed in ((True, False), (False, False), (False, True)):
        q = ready(dict(type='DynamicQuantizer', bits=5, symmetric=sym, signed=signed))
        assert torch.allclose(q(x), reference(x, 5, sym, signed).float(), atol=1e-5)


def test_dim_minus_two_gives_one_scale_per_channel_over_tokens():
    q = ready(dict(type='DynamicQuantizer', bits=6, dim=-2))
    v = data((2, 3, 10, 8))   # (B, heads, N, d)
    codes, scale, zp = q.quantize_dynamic(v)
    assert scale.shape == (2, 3, 1, 8)
    ref = reference(v.transpose(-1, -2), 6, False, False).transpose(-1, -2).float()
    assert torch.allclose(q(v), ref, atol=1e-5)
    assert torch.equal(q.dequantize_dynamic(codes, scale, zp), q(v))


def test_softmax_rows():
    q = ready(dict(type='DynamicSoftmaxQuantizer', bits=4))
    p = torch.softmax(data((2, 3, 9, 9)) * 0.5, -1)
    out = q(p)
    ref = reference(p, 4, True, False).float()
    assert torch.allclose(out, ref, atol=1e-7)
    # the maximum of every row is exact; codes are 0..15
    assert torch.allclose(out.amax(-1), p.amax(-1))
    codes = q.quantize(p)
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    assert torch.equal(q.dequantize(codes), out)


def test_autograd_path_matches_and_passes_gradients():
    q = ready(dict(type='DynamicQuantizer', bits=4, granularity='group', group_size=16))
    x = data().requires_grad_(True)
    y = q(x)
    assert torch.equal(y.detach(), q(x.detach()))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_interface_stats_and_params():
    cfg = dict(type='DynamicQuantizer', bits=8, granularity='group', group_size=8)
    ranks = [build_quantizer(cfg) for _ in range(3)]
    for r, q in enumerate(ranks):
        q.set_mode('observe')
        for _ in range(len(range(r, 7, 3))):
            q(torch.randn(2, 16))
    stats = pickle.loads(pickle.dumps([q.calibration_stats() for q in ranks]))
    merged = ranks[0].merge_calibration_stats(stats)
    assert merged == {'num_batches': 7}
    fresh = build_quantizer(cfg)
    fresh.load_calibration_stats(merged)
    assert fresh.num_observed == 7
    fresh.finalize()
    assert bool(fresh.calibrated)
    with pytest.raises(ValueError, match='round-robin'):
        fresh.merge_calibration_stats([{'num_batches': 1}, {'num_batches': 3}])
    params = fresh.get_params()
    assert set(params) == {'clip_ratio'} and float(params['clip_ratio']) == 1.0
    other = build_quantizer(cfg)
    other.set_params(clip_ratio=torch.tensor(0.75))
    assert bool(other.calibrated) and float(other.get_params()['clip_ratio']) == 0.75
    other.set_mode('quant')
    x = torch.randn(3, 16)
    assert torch.allclose(other(x), reference(x, 8, False, False, clip=0.75, group=8).float(), atol=1e-5)
    with pytest.raises(ValueError, match='clip_ratio'):
        other.set_params(clip_ratio=1.5)
    with pytest.raises((TypeError, ValueError), match='not_a_param'):
        other.set_params(not_a_param=1.0)
    # the state dict holds the parameter only
    assert set(other.state_dict()) == {'calibrated', 'clip_ratio'}
    other.reset()
    assert other.num_observed == 0 and not bool(other.calibrated)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='granularity'):
        DynamicQuantizer(granularity='channel')
    with pytest.raises(ValueError, match='clip_ratio'):
        DynamicQuantizer(clip_ratio=0.0)
    q = ready(dict(type='DynamicQuantizer', granularity='group', group_size=5))
    with pytest.raises(ValueError, match='group_size=5'):
        q(torch.randn(2, 8))


def test_pixel_input_is_exact_on_pixels():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), generator=g).float()
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    q = ready(dict(type='PixelInputQuantizer', mean=mean, std=std))
    assert torch.equal(q.quantize(x), pixels.to(torch.int32))
    assert torch.allclose(q(x), x, atol=1e-6)
    assert set(q.get_params()) == {'mean', 'std'}
    # not-a-pixel values round to the nearest pixel
    assert float(q.quantize(torch.zeros(1, 3, 1, 1))[0, 0]) == 124.0
    with pytest.raises(ValueError, match='channels'):
        q(torch.zeros(1, 4, 2, 2))


def test_fold_pixel_normalization_into_patch_embedding():
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    pixels = torch.randint(0, 256, (1, 3, 8, 8), generator=g).double()
    x = (pixels - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    wf, bf = fold_pixel_normalization(w, b, mean, std)
    assert torch.allclose(F.conv2d(pixels, wf, bf, stride=4), F.conv2d(x, w, b, stride=4), atol=1e-9)


def test_int_matmul_is_exact():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (33, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (64, 24), generator=g, dtype=torch.int8)
    assert torch.equal(int_matmul(a, b), a.long().matmul(b.long()).int())


@pytest.mark.parametrize('act_cfg', [dict(bits=8), dict(bits=8, symmetric=True), dict(bits=4),
                                     dict(bits=8, granularity='group', group_size=16)])
def test_dynamic_int_linear_equals_fake_quant(act_cfg):
    """int8 GEMM with per-row activation scales and per-channel (or per-group) weight scales =
    the fake-quant linear, up to float32 rounding of the final rescale."""
    x = data((2, 9, 64), seed=3)
    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(24, 64, generator=g) * 0.05, torch.randn(24, generator=g)
    act = ready(dict(type='DynamicQuantizer', **act_cfg))
    group = act_cfg.get('group_size') if act_cfg.get('granularity') == 'group' else None
    w_codes, w_scale = symmetric_weight_codes(weight, 8, group)
    assert w_scale.shape == (24, 64 // group if group else 1)
    w_hat = (w_codes.double() * w_scale.double().repeat_interleave(group or 64, dim=1))
    out = dynamic_int_linear(x, act, w_codes, w_scale, bias)
    ref = F.linear(act(x).double(), w_hat, bias.double())
    assert out.shape == (2, 9, 24) and out.dtype == torch.float32
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-6, err
    # the weight grid is the DynamicQuantizer's symmetric per-row grid
    wq = ready(dict(type='DynamicQuantizer', bits=8, symmetric=True,
                    **(dict(granularity='group', group_size=group) if group else {})))
    assert torch.allclose(w_hat.float(), wq(weight), atol=1e-7)


def test_dynamic_int_linear_rejects_wrong_axis_and_wide_codes():
    x = torch.randn(4, 16)
    codes, scale = symmetric_weight_codes(torch.randn(8, 16))
    with pytest.raises(ValueError, match='dim=-1'):
        dynamic_int_linear(x, ready(dict(type='DynamicQuantizer', dim=0)), codes, scale)
    with pytest.raises(ValueError, match='8 bits'):
        dynamic_int_linear(x, ready(dict(type='DynamicQuantizer', bits=10)), codes, scale)


@pytest.mark.parametrize('grid,k', [('log2', 1.0), ('log_sqrt2', 2.0)])
def test_softmax_log_grids_per_row(grid, k):
    bits = 4
    q = ready(dict(type='DynamicSoftmaxQuantizer', bits=bits, grid=grid))
    p = torch.softmax(data((2, 3, 9, 40), seed=5), -1)
    p[0, 0, 0, :5] = 0.0   # exact zeros stay zero
    out = q(p)
    m = p.amax(-1, keepdim=True)
    c = torch.round(-k * torch.log2(p.double() / m.double()))
    ref = torch.where((p > 0) & (c <= 2 ** bits - 2), m.double() * torch.pow(2.0, -c / k),
                      torch.zeros_like(c))
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=0)
    assert torch.equal(out[0, 0, 0, :5], torch.zeros(5))
    codes, scale, zp = q.quantize_dynamic(p)
    assert int(codes.max()) <= 2 ** bits - 1 and scale.shape == (2, 3, 9, 1)
    assert torch.equal(q.dequantize_dynamic(codes, scale, zp), q.dequantize_dynamic(codes, scale, zp))
    pg = p.clone().requires_grad_(True)
    y = q(pg)
    assert torch.allclose(y.detach(), out)
    y.sum().backward()
    assert torch.equal(pg.grad, torch.ones_like(p))   # straight-through


@pytest.mark.parametrize('act_cfg', [dict(bits=8), dict(bits=6, granularity='group', group_size=16)])
def test_dynamic_int_linear_with_asymmetric_weights(act_cfg):
    """Asymmetric per-channel weights (GPTQ / RepQ-ViT grids): the zero-point terms are exact."""
    from fqvit_det.quantizers import build_quantizer as bq
    x = data((3, 5, 64), seed=6)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(16, 64, generator=g) * 0.05 + 0.02
    for bits in (8, 4):
        wq = bq(dict(type='UniformQuantizer', bits=bits, ch_axis=0))
        wq.observe(weight)
        wq.finalize()
        codes = wq.quantize(weight)
        act = ready(dict(type='DynamicQuantizer', **act_cfg))
        out = dynamic_int_linear(x, act, codes, wq.scale, None, wq.zero_point)
        w_hat = (codes.double() - wq.zero_point.double()[:, None]) * wq.scale.double()[:, None]
        ref = F.linear(act(x).double(), w_hat)
        assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-6
