"""mmpretrain classifiers: converters (same roles as timm's), the timm → mmpretrain key mapping,
float equality with timm on real images, and the configs under configs/cls/."""
import collections

import pytest
import timm
import torch

from fqvit_det.calibration import CalibrationRunner, named_quantizers
from fqvit_det.convert import detect_architecture, quantize_model
from fqvit_det.convert.timm_to_mmpretrain import mmpretrain_vit_to_timm, timm_vit_to_mmpretrain
from fqvit_det.nn.modules import QuantConv2d, QuantLayerNorm, QuantLinear
from fqvit_det.presets import make_spec

from .helpers import images, tiny_swin, tiny_vit

mmpretrain = pytest.importorskip('mmpretrain')
from mmpretrain.registry import MODELS  # noqa: E402
from mmpretrain.utils import register_all_modules  # noqa: E402

register_all_modules(init_default_scope=False)

FAST_SEARCH = dict(images=2, rounds=1, eq_n=16, levels=2, top_k=4, max_rows=256)
PRESETS = {
    'fqvit_884': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4),
    'ptq4vit_w8a8': dict(method='ptq4vit', w_bits=8, a_bits=8, search_cfg=FAST_SEARCH),
    'repq_w4a4': dict(method='repq', w_bits=4, a_bits=4),
    'adalog_w8a8': dict(method='adalog', w_bits=8, a_bits=8, search_cfg=FAST_SEARCH),
}


def mm_vit_like(timm_model, device):
    """The mmpretrain ImageClassifier of ``tiny_vit``'s architecture, with its weights."""
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='VisionTransformer', img_size=64, patch_size=16,
                      arch=dict(embed_dims=192, num_layers=2, num_heads=3, feedforward_channels=768)),
        neck=None, head=dict(type='VisionTransformerClsHead', num_classes=10, in_channels=192)))
    model.load_state_dict(timm_vit_to_mmpretrain(timm_model.state_dict()), strict=True)
    return model.to(device).eval()


def mm_tiny_swin(device, seed=0):
    torch.manual_seed(seed)
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='SwinTransformer', img_size=224,
                      arch=dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=256))).to(device).eval()


def role_counts(model):
    return collections.Counter(name.rpartition('.')[2] + ':' + type(q).__name__
                               for name, q in named_quantizers(model))


def assert_complete(model):
    for name, mod in model.named_modules():
        if type(mod) is torch.nn.Linear or type(mod) is torch.nn.Conv2d:
            pytest.fail(f'{name} is still a float {type(mod).__name__}')
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            assert mod.w_quantizer is not None, name
        if name.endswith(('.ln1', '.ln2', '.norm1', '.norm2')) and '.layers.' in name + '.stages.':
            assert isinstance(mod, QuantLayerNorm), name


@pytest.mark.parametrize('preset', PRESETS)
def test_mmpretrain_vit_quantizes_exactly_as_timm_vit(preset, device):
    """Same weights, same preset, same calibration batches: the quantized mmpretrain ViT gives the
    timm ViT's quantized logits bit for bit (same roles, same placement, same integer LayerNorm)."""
    ref = tiny_vit().to(device)
    mm = mm_vit_like(ref, device)
    assert detect_architecture(mm) == 'mmpretrain_vit'
    x = images(ref, 4).to(device)
    with torch.no_grad():
        torch.testing.assert_close(mm(x, mode='tensor'), ref(x), rtol=0, atol=1e-5)
    outs = []
    for model in (ref, mm):
        spec = make_spec(**PRESETS[preset])
        quantize_model(model, spec)
        CalibrationRunner(model, spec, progress=False).run([x[:2], x[2:]])
        with torch.no_grad():
            outs.append(model(x))
    assert_complete(mm)
    assert role_counts(mm) == role_counts(ref)
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize('preset', PRESETS)
def test_mmpretrain_swin_has_timm_swin_roles_and_calibrates(preset, device):
    ref_model, mm = tiny_swin().to(device), mm_tiny_swin(device)
    assert detect_architecture(mm) == 'mmpretrain_swin'
    x = images(ref_model, 4).to(device)
    with torch.no_grad():
        ref = mm(x)
    counts = []
    for model in (ref_model, mm):
        spec = make_spec(**PRESETS[preset])
        quantize_model(model, spec)
        counts.append(role_counts(model))
    assert counts[1] == counts[0]
    assert_complete(mm)
    CalibrationRunner(mm, spec, progress=False).run([x[:2], x[2:]])
    with torch.no_grad():
        out = mm(x)
    sqnr = (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()
    assert sqnr > (8 if preset == 'repq_w4a4' else 20), f'{preset}: SQNR {sqnr:.1f} dB'
    if PRESETS[preset]['method'] == 'fqvit':  # FQ-ViT: integer LayerNorm on the PTF residual codes
        norms = [m for n, m in mm.named_modules() if n.endswith('blocks.0.norm1')]
        assert norms and norms[0].integer and norms[0].input_source is not None


def test_key_mapping_round_trip_and_refusals():
    state = tiny_vit().state_dict()
    mm = timm_vit_to_mmpretrain(state)
    assert 'backbone.layers.1.ffn.layers.0.0.weight' in mm and 'head.layers.head.bias' in mm
    back = mmpretrain_vit_to_timm(mm)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)  # renamed, never copied or changed
    with pytest.raises(ValueError, match="'dist_token'"):
        timm_vit_to_mmpretrain({**state, 'dist_token': torch.zeros(1)})
    with pytest.raises(ValueError, match="'backbone.layers.0.attn.rel_pos'"):
        mmpretrain_vit_to_timm({**mm, 'backbone.layers.0.attn.rel_pos': torch.zeros(1)})
