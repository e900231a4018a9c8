"""Every detection config builds its model and converts it; scope and bad quant_cfg handling."""
import glob
import os.path as osp

import pytest
import torch
from torch import nn

from mmengine.config import Config  # noqa: E402

from fqvit_det.mm.launch import prepare_config  # noqa: E402
from fqvit_det.nn.modules import AttentionQuantizers, QuantConv2d, QuantLinear  # noqa: E402

from .helpers import HAS_DATA, ROOT  # noqa: E402

# Transformer-backbone detectors; the CNN YOLOX configs are checked in tests/test_yolox.py.
DET_CONFIGS = sorted(p for p in glob.glob(osp.join(ROOT, 'configs', '*.py'))
                     if not osp.basename(p).startswith('yolox'))


def build(cfg):
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return MODELS.build(cfg.model)


def load(path, **options):
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(options)
    return prepare_config(cfg, check_data=False)  # building and converting needs no data


def test_there_are_configs_for_every_detector_and_bit_width():
    names = {osp.basename(p) for p in DET_CONFIGS}
    for det in ('mask_rcnn_swin_t', 'mask_rcnn_swin_s', 'cascade_swin_t', 'cascade_swin_s'):
        for bits in ('w8a8a4', 'w8a8', 'w6a6', 'w4a4'):
            assert f'{det}_{bits}.py' in names


@pytest.mark.parametrize('path', DET_CONFIGS, ids=[osp.basename(p) for p in DET_CONFIGS])
def test_config_builds_and_converts(path):
    if 'deit_tiny' in path and not HAS_DATA:
        pytest.skip('the DeiT-Tiny detector loads the real backbone weights from the shared data')
    cfg = load(path)
    assert any(h['type'] == 'CalibrationHook' for h in cfg.custom_hooks)
    model = build(cfg)
    det = model.quant_target
    float_left = [n for n, m in det.named_modules()
                  if (type(m) in (nn.Linear, nn.Conv2d)) and not n.startswith('backbone.vit.pyramid')]
    assert not float_left, f'float layers left: {float_left[:5]}'
    attn = [m for m in det.modules() if hasattr(m, 'aq')]
    assert attn and all(isinstance(m.aq, AttentionQuantizers) and m.aq.probs is not None for m in attn)
    # q, k, v: one qkv-output quantizer (FQ-ViT) or their own (the other methods), never both
    assert all((m.qkv.out_quantizer is not None) != (m.aq.q is not None) for m in attn)
    assert isinstance(det.rpn_head.rpn_conv, QuantConv2d)
    heads = [m for n, m in det.named_modules() if n.startswith('roi_head') and isinstance(m, QuantLinear)]
    assert heads and all(h.w_quantizer is not None and h.in_quantizer is not None for h in heads)


def test_backbone_only_scope():
    cfg = load(osp.join(ROOT, 'configs', 'mask_rcnn_swin_t_w4a4.py'), **{'quant_cfg.scope': 'backbone'})
    det = build(cfg).quant_target
    assert type(det.rpn_head.rpn_conv) is nn.Conv2d
    assert any(isinstance(m, QuantLinear) for m in det.backbone.modules())


def test_plain_mmdet_config_plus_quant_cfg(tmp_path):
    """What README promises: an existing mmdet config + custom_imports + quant_cfg."""
    user_cfg = tmp_path / 'user.py'
    user_cfg.write_text(
        "_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'\n"
        "custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)\n"
        "model = dict(backbone=dict(init_cfg=None))\n"
        "quant_cfg = dict(method='adalog', w_bits=4, a_bits=4, scope='full')\n")
    cfg = Config.fromfile(str(user_cfg))
    cfg = prepare_config(cfg, check_data=False)
    assert cfg.model.type == 'QuantizedDetector'
    model = build(cfg)
    assert model.quant_spec.method == 'adalog'
    assert isinstance(model.quant_target.backbone.stages[0].blocks[0].attn.w_msa.aq, AttentionQuantizers)


@pytest.mark.parametrize('override, key', [
    ({'quant_cfg.scope': 'neck'}, 'quant_cfg.scope'),
    ({'quant_cfg.method': 'gptq'}, 'quant_cfg.method'),
    ({'quant_cfg.a_bits': 0}, 'quant_cfg.a_bits'),
    ({'quant_cfg.roles': {'attn_probs': {'type': 'LogSqrt3'}}}, 'quant_cfg.roles.attn_probs'),
])
def test_malformed_quant_cfg_fails_before_building(override, key):
    with pytest.raises(ValueError) as err:
        load(osp.join(ROOT, 'configs', 'mask_rcnn_swin_t_w8a8a4.py'), **override)
    assert key in str(err.value)


def test_checkpoint_that_does_not_match_is_named(tmp_path):
    from safetensors.torch import save_file
    bad = tmp_path / 'bad.safetensors'
    save_file({'backbone.nope': torch.zeros(1)}, str(bad))
    cfg = load(osp.join(ROOT, 'configs', 'mask_rcnn_swin_t_w8a8a4.py'))
    cfg.model.checkpoint = str(bad)
    with pytest.raises(ValueError, match='does not match the model'):
        build(cfg)


def test_mmdet_swin_residual_stream_links_and_merging_codes():
    """FQ-ViT placement on mmdet's Swin: every norm reads the quantizer that produced its input,
    the patch-merging norm reads the stage's last residual with mmdet's unfold order (c·4 + p),
    and the integer LayerNorm consumes those codes."""
    import torch
    from mmdet.models.backbones import SwinTransformer

    from fqvit_det.calibration import CalibrationRunner
    from fqvit_det.convert import quantize_model
    from fqvit_det.convert.mmdet_swin import mmdet_swin_rules
    from fqvit_det.presets import make_spec
    from fqvit_det.quantizers.ptf import int_layernorm_reference

    torch.manual_seed(0)
    net = torch.nn.Module()
    net.backbone = SwinTransformer(embed_dims=32, depths=(2, 1), num_heads=(1, 2), window_size=4,
                                   out_indices=(0, 1))
    net.eval()  # (mmdet's SwinTransformer.train returns None)
    spec = make_spec('fqvit', 8, 8, 4)
    quantize_model(net, spec, rules=mmdet_swin_rules('backbone.'))
    bb = net.backbone
    assert bb.patch_embed.norm.input_source is bb.patch_embed.projection.out_quantizer
    assert bb.stages[0].blocks[0].norm1.input_source is bb.patch_embed.norm.out_quantizer
    assert bb.stages[0].blocks[1].norm1.input_source is bb.stages[0].blocks[0].mlp_residual_quantizer
    assert bb.stages[1].blocks[0].norm1.input_source is bb.stages[0].downsample.reduction.out_quantizer
    assert bb.norm0.input_source is bb.stages[0].blocks[1].mlp_residual_quantizer
    merge_norm, ptf = bb.stages[0].downsample.norm, bb.stages[0].blocks[1].mlp_residual_quantizer
    assert merge_norm.input_source is ptf and merge_norm.in_quantizer is None

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    CalibrationRunner(net, spec, forward_fn=lambda m, b: m.backbone(b), progress=False).run([x[:2], x[2:]])
    store = {}
    handles = [merge_norm.register_forward_pre_hook(lambda m, a: store.__setitem__('in', a[0].clone())),
               merge_norm.register_forward_hook(lambda m, a, o: store.__setitem__('out', o.clone()))]
    with torch.no_grad():
        bb(x)
    for h in handles:
        h.remove()
    alpha = ptf.alpha.repeat_interleave(4)
    scale = ptf.base_scale * 2.0 ** alpha.float()
    q = torch.clamp(torch.round(store['in'] / scale) + ptf.zero_point, 0, ptf.qmax) - ptf.zero_point
    assert torch.equal(q * scale, store['in'])
    oq = merge_norm.out_quantizer
    want = oq.dequantize(int_layernorm_reference((q * 2.0 ** alpha.float()).to(torch.int32), ptf.base_scale,
                                                 merge_norm.weight, merge_norm.bias, oq.scale, oq.zero_point,
                                                 out_bits=oq.bits, eps=merge_norm.eps))
    assert torch.equal(store['out'], want)


def test_deit_backbone_residual_stream_is_linked():
    from mmengine.registry import MODELS as MM_MODELS  # noqa: F401

    from fqvit_det.convert import quantize_model
    from fqvit_det.mm.det import TimmViTBackbone, backbone_rules
    from fqvit_det.presets import make_spec
    import torch

    net = torch.nn.Module()
    net.backbone = TimmViTBackbone('vit_tiny_patch16_224')
    net.backbone.vit.blocks = net.backbone.vit.blocks[:2]
    quantize_model(net, make_spec('fqvit', 8, 8, 4), rules=backbone_rules(net.backbone))
    vit = net.backbone.vit
    assert vit.blocks[0].norm1.input_source is vit.residual_quantizer
    assert vit.norm.input_source is vit.blocks[1].mlp_residual_quantizer
    assert vit.norm.output_target is None  # no head: the pyramid convs quantize their inputs
    with torch.no_grad():
        feats = net.backbone(torch.randn(1, 3, 40, 56))  # dynamic size: resampled pos_embed
    assert [f.shape[-2:] for f in feats][2] == (3, 4)


def test_ptq4vit_detector_needs_explicit_mse_metric(tmp_path):
    """The Hessian-guided metric needs logits: a detector fails at config time with the fix."""
    def cfg_with(quant_cfg):
        path = tmp_path / 'user.py'
        path.write_text("_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'\n"
                        "custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)\n"
                        f'quant_cfg = {quant_cfg!r}\n')
        return prepare_config(Config.fromfile(str(path)), check_data=False)
    with pytest.raises(ValueError, match=r"set quant_cfg\.search_cfg\.metric='mse'"):
        cfg_with(dict(method='ptq4vit', w_bits=6, a_bits=6))
    cfg = cfg_with(dict(method='ptq4vit', w_bits=6, a_bits=6, search_cfg=dict(metric='mse')))
    assert cfg.model.quant_cfg.search_cfg.metric == 'mse'
