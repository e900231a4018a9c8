"""Every classification config parses and resolves to a valid quantization recipe (no data needed)."""
import glob
import os.path as osp

import pytest

from mmengine.config import Config  # noqa: E402

from fqvit_det.mm.launch import prepare_config  # noqa: E402
from fqvit_det.mm.quant_model import split_quant_cfg  # noqa: E402
from fqvit_det.presets import make_spec  # noqa: E402

from .helpers import ROOT  # noqa: E402

CLS_CONFIGS = sorted(p for p in glob.glob(osp.join(ROOT, 'configs', 'cls', '*.py'))
                     if not osp.basename(p).startswith('_'))


@pytest.mark.parametrize('path', CLS_CONFIGS, ids=[osp.basename(p) for p in CLS_CONFIGS])
def test_cls_config_resolves(path):
    raw = Config.fromfile(path)
    assert raw.default_scope == 'mmpretrain'  # mmpretrain's dataset, pipeline, Accuracy, models
    assert raw.test_evaluator.type == 'Accuracy'
    assert raw.test_dataloader.dataset.type == 'ImageNet'
    assert raw.test_dataloader.dataset.data_root.endswith('imagenet/val1300')
    # Exactly one weight source: the named checkpoint (no silent hub fallback).
    assert raw.load_from.endswith(('.safetensors', '.pth')) and not raw.model.get('pretrained', False)
    cfg = prepare_config(raw, check_data=False)  # what tools/test.py runs
    assert cfg.model.type == 'QuantizedClassifier'
    assert cfg.model.checkpoint == raw.load_from and not cfg.get('load_from')
    qcfg = cfg.model.quant_cfg.to_dict()
    spec, glue = split_quant_cfg(qcfg)  # the path tools/test.py validates with
    assert glue == {}
    for key in ('method', 'w_bits', 'a_bits', 'attn_bits', 'calib_images'):
        assert getattr(spec, key) == qcfg[key], key
    assert spec.roles['weight']['bits'] == qcfg['w_bits']
    hooks = [h for h in cfg.custom_hooks if h.type == 'CalibrationHook']
    assert len(hooks) == 1 and hooks[0].dataloader.dataset.data_root.endswith('imagenet/calib1000')


def test_mix_config_is_a_role_override_of_a_preset():
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'cls', 'deit_tiny_mix_w4a4.py'))
    spec = make_spec(**cfg.quant_cfg)
    assert spec.method == 'adalog' and spec.search == 'fpcs'
    assert spec.roles['attn_probs']['type'] == 'LogSqrt2Quantizer'
    assert spec.roles['fc2_input']['type'] == 'AdaLogQuantizer'
