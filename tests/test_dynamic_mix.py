"""The dynamic-activation role mix (configs/*dyn_w*a*.py) on a tiny ViT: conversion places the
dynamic quantizers on the roles the config names, calibration runs, a state file round-trips, and the
shipped configs resolve and build (detector conversion needs the shared DeiT-Tiny weights)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.mm.launch import prepare_config
from fqvit_det.presets import make_spec
from fqvit_det.quantizers.dynamic import (DynamicQuantizer, DynamicSoftmaxQuantizer,
                                          PixelInputQuantizer)
from fqvit_det.state import load_quant_state, save_quant_state

from .helpers import HAS_DATA, ROOT, images, tiny_vit

CLS = [osp.join(ROOT, 'configs', 'cls', f'deit_tiny_dyn_w{b}a{b}.py') for b in (8, 6, 4)]
DET = [osp.join(ROOT, 'configs', f'mask_rcnn_deit_tiny_dyn_w{b}a{b}.py') for b in (8, 6, 4)]


def spec_of(path, weight=None):
    qcfg = Config.fromfile(path).get('quant_cfg').to_dict()
    if weight is not None:   # the GPTQ pass is tested by its owner; keep this test fast
        qcfg['roles'] = dict(qcfg['roles'], weight=weight, patch_embed_weight=weight)
    return make_spec(**{k: v for k, v in qcfg.items() if k != 'scope'})


@pytest.mark.parametrize('path', CLS, ids=[osp.basename(p) for p in CLS])
def test_cls_mix_converts_calibrates_and_round_trips(path, tmp_path, device):
    spec = spec_of(path)
    assert spec.reparam is False and spec.integer_layernorm is False
    model = tiny_vit().to(device)
    x = images(model, 4).to(device)
    with torch.no_grad():
        ref = model(x)
    quantize_model(model, spec)
    blk = model.blocks[0]
    assert isinstance(model.patch_embed.proj.in_quantizer, PixelInputQuantizer)
    assert isinstance(blk.attn.aq.probs, DynamicSoftmaxQuantizer) and blk.attn.aq.probs.grid == 'log_sqrt2'
    assert blk.attn.aq.v.dim == -2 and blk.attn.aq.q.granularity == 'token'
    assert isinstance(blk.mlp.fc2.in_quantizer, DynamicQuantizer)
    assert blk.mlp.fc2.in_quantizer.granularity == 'group'
    CalibrationRunner(model, spec, progress=False).run([x[:2], x[2:]])
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    bits = spec.a_bits
    snr = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert snr > {8: 20, 6: 10, 4: 0}[bits], snr
    state = save_quant_state(model, str(tmp_path / 'q.safetensors'), spec)
    fresh = tiny_vit().to(device)
    quantize_model(fresh, spec)
    load_quant_state(fresh, state, spec)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_dynamic_activations_need_no_calibration_data():
    """Only the weights are static: the same weights give the same output whatever the
    calibration images (RepQ-ViT percentile weights here)."""
    spec = spec_of(CLS[1], weight=dict(type='UniformQuantizer', bits=6, ch_axis=0))
    outs = []
    for seed in (1, 2):
        model = tiny_vit()
        quantize_model(model, spec)
        CalibrationRunner(model, spec, progress=False).run([images(model, 2, seed=seed)])
        with torch.no_grad():
            outs.append(model(images(model, 3, seed=9)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not HAS_DATA, reason='the DeiT-Tiny detector loads the real backbone weights '
                                         'from the shared data')
def test_det_configs_put_dynamic_quantizers_on_the_backbone():
    from mmengine.registry import MODELS, init_default_scope
    for path in DET:
        cfg = prepare_config(Config.fromfile(path), check_data=False)
        assert cfg.model.quant_cfg.calib_images == 32
        init_default_scope('mmdet')
        det = MODELS.build(cfg.model).quant_target
        vit = det.backbone.vit
        assert isinstance(vit.patch_embed.proj.in_quantizer, PixelInputQuantizer)
        for blk in vit.blocks:
            assert isinstance(blk.norm1.out_quantizer, DynamicQuantizer)
            assert isinstance(blk.attn.aq.probs, DynamicSoftmaxQuantizer)
            assert type(blk.attn.qkv.w_quantizer).__name__ == 'GPTQWeightQuantizer'
        # neck / heads keep RepQ-ViT's static quantizers
        assert type(det.rpn_head.rpn_conv.in_quantizer).__name__ == 'UniformQuantizer'
