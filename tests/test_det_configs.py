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
    attn = [m for m in det.modules() if isinstance(m, AttentionQuantizers)]
    assert attn and all(a.q is not None and a.probs is not None for a in attn)
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
