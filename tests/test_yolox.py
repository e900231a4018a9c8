"""The real COCO-trained YOLOX-Nano (../shared/data/yolox_nano) through the mmdet glue: strict
safetensors loading, exact BatchNorm folding, all convolutions quantized, and tools/test.py on
a few coco_mini images at reduced input size."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from torch import nn

from .helpers import DATA, HAS_COCO, ROOT

CKPT = osp.join(DATA, 'yolox_nano', 'yolox_nano_coco.safetensors')
CONFIG = osp.join(ROOT, 'configs', 'yolox_nano_w8a8.py')
needs_ckpt = pytest.mark.skipif(not osp.isfile(CKPT), reason=f'{CKPT} not found')


def _model_cfg():
    from mmengine.config import Config
    return Config.fromfile(CONFIG).model


def _build(quant_cfg=None, checkpoint=CKPT):
    from fqvit_det.mm.det import QuantizedDetector
    return QuantizedDetector(detector=_model_cfg(), quant_cfg=quant_cfg, checkpoint=checkpoint).eval()


def _outputs(detector, x):
    with torch.no_grad():
        return [t for level in detector._forward(x) for t in level]


@needs_ckpt
def test_bn_fold_keeps_the_real_yolox_outputs():
    from fqvit_det.convert.bn_fold import fold_batchnorm
    from fqvit_det.mm.det import QuantizedDetector  # noqa: F401  (registers mmdet modules)
    model = _build()
    x = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(0)) * 255
    ref = _outputs(model.detector, x)
    folded = fold_batchnorm(model.detector)
    assert len(folded) == 104  # every ConvModule of backbone, neck and head
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.detector.modules())
    for a, b in zip(ref, _outputs(model.detector, x)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@needs_ckpt
def test_quant_cfg_folds_and_quantizes_every_conv():
    from fqvit_det.calibration import set_quant_mode
    from fqvit_det.nn.modules import QuantConv2d
    float_model = _build()
    model = _build(dict(method='fqvit', w_bits=8, a_bits=8))
    assert len(model.folded_bn) == 104
    convs = {n: m for n, m in model.detector.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 113 and all(isinstance(m, QuantConv2d) for m in convs.values())
    depthwise = [m for m in convs.values() if m.groups > 1]
    assert len(depthwise) == 30 and all(m.w_quantizer is not None for m in depthwise)
    # Depthwise inputs take their own role (per-channel scales are integer-exact there).
    assert all(m.in_quantizer.qname.endswith('det_dw_input') for m in depthwise)
    # The conv reading the image takes the patch-embedding roles, all others the detection roles.
    assert convs['backbone.stem.conv.conv'].in_quantizer.qname.endswith('patch_embed_input')
    assert convs['bbox_head.multi_level_conv_obj.2'].w_quantizer.qname.endswith('det_weight')
    # Float mode of the quantized wrapper is the folded float model (the --compare-float baseline).
    set_quant_mode(model.detector, 'float')
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)) * 255
    for a, b in zip(_outputs(float_model.detector, x), _outputs(model.detector, x)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@needs_ckpt
def test_mismatching_checkpoint_names_file_and_keys(tmp_path):
    from safetensors.torch import load_file, save_file
    state = load_file(CKPT)
    state['neck.extra.weight'] = torch.zeros(1)
    del state['bbox_head.multi_level_conv_obj.0.bias']
    bad = str(tmp_path / 'bad.safetensors')
    save_file(state, bad)
    with pytest.raises(ValueError) as err:
        _build(checkpoint=bad)
    msg = str(err.value)
    assert bad in msg and 'bbox_head.multi_level_conv_obj.0.bias' in msg and 'neck.extra.weight' in msg
    state = load_file(CKPT)
    state['backbone.stem.conv.conv.weight'] = state['backbone.stem.conv.conv.weight'][:8]
    save_file(state, bad)
    with pytest.raises(ValueError, match=r'backbone\.stem\.conv\.conv\.weight: checkpoint \(8,'):
        _build(checkpoint=bad)


@needs_ckpt
def test_load_from_becomes_the_wrapper_checkpoint():
    from mmengine.config import Config
    from fqvit_det.mm.launch import prepare_config
    cfg = prepare_config(Config.fromfile(CONFIG), check_data=False)
    assert cfg.model.type == 'QuantizedDetector' and cfg.load_from is None
    assert osp.samefile(cfg.model.checkpoint, CKPT)
    assert not [h for h in cfg.custom_hooks if h.type == 'EMAHook']
    # A plain mmdet config (no quant_cfg) given a safetensors checkpoint is wrapped to load it.
    plain = Config.fromfile(CONFIG)
    plain.quant_cfg = None
    plain.load_from = None
    cfg = prepare_config(plain, checkpoint=CKPT, check_data=False)
    assert cfg.model.type == 'QuantizedDetector' and cfg.model.get('quant_cfg') is None
    assert cfg.model.checkpoint == CKPT


YOLOX_CONFIGS = [osp.join(ROOT, 'configs', f'yolox_nano_{b}.py')
                 for b in ('w8a8', 'w6a6', 'w4a4', 'gptq_w8a8', 'gptq_w6a6', 'gptq_w4a4')]


@needs_ckpt
@pytest.mark.parametrize('path', YOLOX_CONFIGS, ids=osp.basename)
def test_yolox_config_builds_and_converts_every_conv(path):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from fqvit_det.mm.launch import prepare_config
    cfg = prepare_config(Config.fromfile(path), check_data=False)
    assert any(h['type'] == 'CalibrationHook' for h in cfg.custom_hooks)
    init_default_scope('mmdet')
    det = MODELS.build(cfg.model).quant_target
    assert not [n for n, m in det.named_modules() if type(m) in (nn.Conv2d, nn.BatchNorm2d)]
    bits = int(osp.basename(path).split('_w')[-1][0])
    stem = det.backbone.stem.conv.conv
    assert stem.in_quantizer.bits == 8 and stem.w_quantizer.bits == bits
    dw = det.backbone.stage1[0].depthwise_conv.conv
    assert dw.in_quantizer.bits == bits and dw.in_quantizer.ch_axis == 1
    if 'gptq' in path:  # every conv weight, the stem's and the depthwise ones included
        from fqvit_det.nn.modules import QuantConv2d
        from fqvit_det.quantizers.gptq import GPTQWeightQuantizer
        convs = [m for m in det.modules() if isinstance(m, QuantConv2d)]
        assert convs and all(isinstance(m.w_quantizer, GPTQWeightQuantizer) for m in convs)


def test_depthwise_role_defaults_to_det_input():
    from fqvit_det.presets import make_spec
    for method in ('fqvit', 'ptq4vit', 'repq', 'adalog'):
        spec = make_spec(method, w_bits=6, a_bits=6)
        assert spec.roles['det_dw_input'] == spec.roles['det_input']
    own = dict(type='UniformQuantizer', bits=4, ch_axis=1)
    spec = make_spec('fqvit', roles=dict(det_input=own))
    assert spec.roles['det_dw_input'] == own  # follows a det_input override ...
    spec = make_spec('fqvit', roles=dict(det_dw_input=own))
    assert spec.roles['det_dw_input'] == own and spec.roles['det_input'] != own  # ... or its own


SMALL = ['test_dataloader.dataset.indices=3', 'test_dataloader.num_workers=0',
         'calib_dataloader.num_workers=0', 'test_dataloader.dataset.pipeline.1.scale=(160,160)',
         'calib_dataloader.dataset.pipeline.1.scale=(160,160)']


@needs_ckpt
@pytest.mark.skipif(not HAS_COCO, reason=f'coco_mini not found under {DATA}')
@pytest.mark.parametrize('config', [CONFIG, osp.join(ROOT, 'configs', 'yolox_nano_gptq_w8a8.py')],
                         ids=osp.basename)
def test_tools_test_quantized_yolox_on_three_images(tmp_path, config):
    work = str(tmp_path / 'work')
    env = dict(os.environ, FQVIT_DATA=osp.abspath(DATA), PYTHONPATH=ROOT)
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'test.py'), config, '--work-dir', work,
           '--compare-float', '--calib-images', '2', '--cfg-options', *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    with open(osp.join(work, 'summary.json')) as f:
        summary = json.load(f)
    for kind in ('float', 'quant'):
        metrics = summary[kind]['metrics']
        assert 0.0 < metrics['coco/bbox_mAP_50'] <= 1.0, metrics
    # agreement: the quantized predictions scored against the float ones (score >= 0.3) as truth
    agreement = summary['agreement']['metrics']
    assert agreement['gt_score_thr'] == 0.3 and agreement['num_pseudo_gt'] > 0, agreement
    assert 0.0 < agreement['bbox_mAP'] <= 1.0 and 'segm_mAP' not in agreement, agreement
    assert 'agree : bbox_mAP=' in proc.stdout
    assert 'calibration: 2 of 2 images' in proc.stdout + proc.stderr
