"""Per-channel input scales of a dense conv folded into its weight: the fake-quant output equals
the integer computation conv(q − z, Q(W·diag(s))) · Δ_o + b written out from the codes."""
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.nn.modules import QuantConv2d
from fqvit_det.quantizers import UniformQuantizer
from fqvit_det.state import load_quant_state, save_quant_state

SPEC = types.SimpleNamespace(search=None, reparam=False, bias_correction=0)


def _model(seed, in_ch_axis, groups=1, channels=6):
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels if groups > 1 else 4, 3, padding=1, groups=groups)
    wq = UniformQuantizer(bits=8, symmetric=True, ch_axis=0)
    iq = UniformQuantizer(bits=8, ch_axis=in_ch_axis)
    return nn.Sequential(QuantConv2d.from_float(conv, w_quantizer=wq, in_quantizer=iq))


def _inputs(device, n=3, channels=6):
    g = torch.Generator().manual_seed(1)
    # channel ranges spread 1 .. 60, one-sided (SiLU-like) channels included
    x = torch.randn(n, channels, 9, 11, generator=g) * torch.tensor([1., 3., 60., 0.5, 8., 20.])[:channels, None, None]
    x[:, 3] = F.silu(x[:, 3])
    return x.to(device)


def _calibrated(seed, in_ch_axis, device, groups=1):
    model = _model(seed, in_ch_axis, groups).to(device).eval()
    CalibrationRunner(model, SPEC, progress=False).run([_inputs(device)])
    return model


def test_dense_conv_folds_per_channel_input_scales_integer_exactly(device):
    model = _calibrated(0, 1, device)
    conv, x = model[0], _inputs(device)
    iq, wq = conv.in_quantizer, conv.w_quantizer
    s = iq.scale.reshape(1, -1, 1, 1)
    assert torch.equal(conv.input_channel_scale(), s)
    with torch.no_grad():
        y = model(x)
        codes = iq.quantize(x).double() - iq.zero_point.reshape(1, -1, 1, 1).double()
        w_codes = wq.quantize(conv.weight * s).double()  # symmetric: zero point 0
        acc = F.conv2d(codes, w_codes, padding=1)  # integer sum (exact in float64)
        assert torch.equal(acc, acc.round())
        ref = acc * wq.scale.double().reshape(1, -1, 1, 1) + conv.bias.double().reshape(1, -1, 1, 1)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_folding_beats_per_tensor_on_skewed_channels(device):
    x = _inputs(device)
    ref = F.conv2d(x, _model(0, 1)[0].weight.to(device), _model(0, 1)[0].bias.to(device), padding=1)

    def sqnr(model):
        with torch.no_grad():
            err = model(x) - ref
        return 10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum()).item()
    per_tensor, per_channel = sqnr(_calibrated(0, None, device)), sqnr(_calibrated(0, 1, device))
    assert _calibrated(0, None, device)[0].input_channel_scale() is None
    assert per_channel > per_tensor + 2, (per_tensor, per_channel)


def test_depthwise_conv_needs_no_fold(device):
    model = _calibrated(0, 1, device, groups=6)
    assert model[0].input_channel_scale() is None  # the scale factors out of each channel's sum


def test_state_reload_keeps_the_folded_weights(tmp_path, device):
    model = _calibrated(0, 1, device)
    path = save_quant_state(model, str(tmp_path / 'state.safetensors'))
    fresh = _model(0, 1).to(device).eval()
    load_quant_state(fresh, path)
    x = _inputs(device)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize('bits', [4, 8])
def test_recalibration_refolds_with_the_new_scales(bits, device):
    model = _model(0, 1).to(device).eval()
    model[0].w_quantizer = UniformQuantizer(bits=bits, symmetric=True, ch_axis=0).to(device)
    runner = CalibrationRunner(model, SPEC, progress=False)
    runner.run([_inputs(device)])
    first = model[0].w_quantizer.get_params()['scale'].clone()
    runner.run([_inputs(device) * 4])  # 4x wider inputs: 4x input scales, weight ranges follow
    assert torch.allclose(model[0].w_quantizer.get_params()['scale'], 4 * first, rtol=1e-4)
