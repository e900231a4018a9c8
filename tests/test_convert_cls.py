"""Every preset on small timm ViT / Swin: complete conversion, calibration, fidelity, saved state."""
import pytest
import torch
from torch import nn

from fqvit_det.calibration import CalibrationRunner, named_quantizers, set_quant_mode
from fqvit_det.convert import quantize_model
from fqvit_det.convert.timm_swin import QuantTimmWindowAttention
from fqvit_det.convert.timm_vit import QuantTimmAttention
from fqvit_det.nn.modules import QuantConv2d, QuantLayerNorm, QuantLinear
from fqvit_det.presets import make_spec
from fqvit_det.state import load_quant_state, save_quant_state

from .helpers import images, tiny_swin, tiny_vit

FAST_SEARCH = dict(images=2, rounds=1, eq_n=16, levels=2, top_k=4, max_rows=256)
PRESETS = {
    'fqvit_888': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=8, lis=False),
    'fqvit_884': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4),
    'ptq4vit_w8a8': dict(method='ptq4vit', w_bits=8, a_bits=8, search_cfg=FAST_SEARCH),
    'repq_w8a8': dict(method='repq', w_bits=8, a_bits=8),
    'adalog_w8a8': dict(method='adalog', w_bits=8, a_bits=8, search_cfg=FAST_SEARCH),
}
MODELS = {'vit': (tiny_vit, QuantTimmAttention), 'swin': (tiny_swin, QuantTimmWindowAttention)}


def sqnr_db(ref, out):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def build(arch, preset):
    factory, attn_cls = MODELS[arch]
    model = factory()
    x = images(model, 4)
    with torch.no_grad():
        ref = model(x)
    spec = make_spec(**PRESETS[preset])
    quantize_model(model, spec)
    return model, spec, x, ref, attn_cls


def assert_complete(model, attn_cls):
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear or type(mod) is nn.Conv2d:
            pytest.fail(f'{name} is still a float {type(mod).__name__}')
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            assert mod.w_quantizer is not None, f'{name}: weight not quantized'
        if name.endswith('.attn'):
            assert type(mod) is attn_cls and hasattr(mod, 'aq'), f'{name}: attention not converted'
            qkv_out = mod.qkv.out_quantizer  # FQ-ViT: q, k, v as one tensor
            assert (qkv_out is not None) != (mod.aq.q is not None), f'{name}: q/k/v quantized twice or never'
            assert (mod.aq.q is None) == (mod.aq.k is None) == (mod.aq.v is None)
            assert mod.aq.probs is not None
        if name.endswith(('.norm1', '.norm2')):
            assert isinstance(mod, QuantLayerNorm) and mod.out_quantizer is not None


@pytest.mark.parametrize('arch', MODELS)
@pytest.mark.parametrize('preset', PRESETS)
def test_preset_end_to_end(arch, preset, tmp_path):
    model, spec, x, ref, attn_cls = build(arch, preset)
    assert_complete(model, attn_cls)
    CalibrationRunner(model, spec, progress=False).run([x[:2], x[2:]])
    assert all(q.mode == 'quant' for _, q in named_quantizers(model))
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    # 8-bit weights/activations on random-init models: the logits stay close to float.
    assert sqnr_db(ref, out) > 25, f'{arch}/{preset}: SQNR {sqnr_db(ref, out):.1f} dB'

    # Saved state reloads into a freshly converted model with bit-identical outputs.
    path = save_quant_state(model, str(tmp_path / 'state.safetensors'), spec)
    fresh, spec2, _, _, _ = build(arch, preset)
    load_quant_state(fresh, path, spec2)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_lower_bits_lose_more():
    errs = {}
    for bits in (8, 4):
        model = tiny_vit()
        x = images(model, 4)
        with torch.no_grad():
            ref = model(x)
        spec = make_spec('repq', bits, bits)
        quantize_model(model, spec)
        CalibrationRunner(model, spec, progress=False).run([x])
        with torch.no_grad():
            errs[bits] = sqnr_db(ref, model(x))
    assert errs[8] > errs[4] + 6


def test_float_mode_is_exactly_float():
    model, spec, x, ref, _ = build('swin', 'fqvit_884')
    CalibrationRunner(model, spec, progress=False).run([x])
    set_quant_mode(model, 'float')
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_state_mismatch_is_a_clear_error(tmp_path):
    model, spec, x, _, _ = build('vit', 'repq_w8a8')
    CalibrationRunner(model, spec, progress=False).run([x])
    path = save_quant_state(model, str(tmp_path / 's.safetensors'), spec)
    other, spec_other, _, _, _ = build('vit', 'fqvit_884')
    with pytest.raises(ValueError, match='calibrated with'):
        load_quant_state(other, path, spec_other)
    # A state of another architecture: refused with the file named, before anything is loaded.
    vit, vit_spec, x, _, _ = build('vit', 'fqvit_888')
    CalibrationRunner(vit, vit_spec, progress=False).run([x])
    vit_path = save_quant_state(vit, str(tmp_path / 'vit.safetensors'), vit_spec)
    swin, swin_spec, _, _, _ = build('swin', 'fqvit_888')
    with pytest.raises(ValueError, match='vit.safetensors'):
        load_quant_state(swin, vit_path, swin_spec)


def test_nan_in_calibration_names_the_tensor():
    model, spec, x, _, _ = build('vit', 'fqvit_888')
    x = x.clone()
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='patch_embed'):
        CalibrationRunner(model, spec, progress=False).run([x])
