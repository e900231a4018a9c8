"""Empirical bias correction: after it, every quantized layer's per-channel output mean on the
correction images equals the float layer's (given its corrected predecessors); float mode is
untouched; the corrections survive the state file."""
import types

import pytest
import torch
from torch import nn

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.calibration.bias_correction import bias_corrections, channel_mean, merge_batches
from fqvit_det.nn.modules import QuantConv2d, QuantLinear
from fqvit_det.quantizers import UniformQuantizer
from fqvit_det.state import load_quant_state, save_quant_state
from fqvit_det.walk import set_quant_mode


def _spec(images):
    return types.SimpleNamespace(search=None, reparam=False, bias_correction=images)


def _q(bits, **kw):
    return UniformQuantizer(bits=bits, **kw)


class Net(nn.Module):
    """conv → SiLU → conv → SiLU → pool → Linear, all quantized at 4 bits (visible mean shifts)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = QuantConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), _q(4, symmetric=True, ch_axis=0), _q(8))
        self.c2 = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1), _q(4, symmetric=True, ch_axis=0), _q(4))
        self.fc = QuantLinear.from_float(nn.Linear(8, 5), _q(4, symmetric=True, ch_axis=0), _q(4))

    def forward(self, x):
        x = nn.functional.silu(self.c2(nn.functional.silu(self.c1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _batches(device, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(2, 3, 12, 12, generator=g) * 4 + 1).to(device) for _ in range(n)]


def _layer_means(model, batch):
    means = {}

    def record(name):
        def hook(mod, inputs, out):
            means[name] = channel_mean(mod, out)
        return hook
    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_children()]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    return means


def test_corrected_layers_reproduce_the_float_means(device):
    model = Net().to(device).eval()
    batches = _batches(device)
    CalibrationRunner(model, _spec(6), progress=False).run(batches)
    assert set(bias_corrections(model)) == {'c1', 'c2', 'fc'}
    used = merge_batches(batches[:3])  # 6 images = the first three batches of two
    set_quant_mode(model, 'float')
    want = _layer_means(model, used)
    set_quant_mode(model, 'quant')
    got = _layer_means(model, used)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5), name
    assert bias_corrections(model)['c2'].abs().max() > 1e-3  # there was a shift to remove


def test_float_mode_is_untouched_and_held_out_error_drops(device):
    plain, corrected = Net().to(device).eval(), Net().to(device).eval()
    CalibrationRunner(plain, _spec(0), progress=False).run(_batches(device))
    CalibrationRunner(corrected, _spec(8), progress=False).run(_batches(device))
    assert bias_corrections(plain) == {}
    x = torch.cat(_batches(device, n=4, seed=7))  # held-out images of the same distribution
    with torch.no_grad():
        set_quant_mode(corrected, 'float')
        ref = corrected(x)
        set_quant_mode(corrected, 'quant')
        err_corrected = (corrected(x) - ref).pow(2).mean()
        err_plain = (plain(x) - ref).pow(2).mean()
        set_quant_mode(plain, 'float')
        assert torch.equal(plain(x), ref)  # same weights; the correction only acts when quantizing
    assert err_corrected < 0.5 * err_plain, (err_corrected, err_plain)


def test_state_file_keeps_the_corrections(tmp_path, device):
    model = Net().to(device).eval()
    CalibrationRunner(model, _spec(4), progress=False).run(_batches(device))
    path = save_quant_state(model, str(tmp_path / 'state.safetensors'))
    fresh = Net().to(device).eval()
    load_quant_state(fresh, path)
    x = _batches(device, n=1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    other = Net().to(device).eval()
    other.fc = QuantLinear.from_float(nn.Linear(8, 6), _q(4, symmetric=True, ch_axis=0), _q(4)).to(device)
    with pytest.raises(ValueError):
        load_quant_state(other, path)


def test_option_is_validated_and_left_out_of_recipes_when_off():
    from fqvit_det.presets import make_spec
    from fqvit_det.validation import QuantConfigError
    assert 'bias_correction' not in make_spec('repq').to_dict()
    assert make_spec('repq', bias_correction=16).to_dict()['bias_correction'] == 16
    with pytest.raises(QuantConfigError, match='quant_cfg.bias_correction'):
        make_spec('repq', bias_correction=-1)
