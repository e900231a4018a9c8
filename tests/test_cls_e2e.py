"""Classification through tools/test.py: a tiny synthetic config (always) and the DeiT-Tiny config
on real images (when present)."""
import json
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

from fqvit_det.validation import QuantConfigError

from .helpers import DATA, HAS_DATA, ROOT
from .tiny_cls import MODEL, load_tool, make_images, write_config

needs_data = pytest.mark.skipif(not HAS_DATA, reason=f'real data not found at {DATA}')
SMALL = ['--cfg-options', 'test_dataloader.dataset.indices=8', 'test_dataloader.batch_size=4',
         'test_dataloader.num_workers=0', 'custom_hooks.0.dataloader.num_workers=0',
         'custom_hooks.0.dataloader.batch_size=4']


def run(args, tmp_path, name):
    env = dict(os.environ, FQVIT_DATA=osp.abspath(DATA), PYTHONPATH=ROOT)
    work = str(tmp_path / name)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'test.py'), *args, '--work-dir', work],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(osp.join(work, 'summary.json')) as f:
        return json.load(f), work, proc.stdout + proc.stderr


@needs_data
def test_deit_tiny_config_calibrates_evaluates_and_reloads(tmp_path):
    cfg = 'configs/cls/deit_tiny_w8a8a4.py'
    summary, work, log = run([cfg, '--compare-float', '--calib-images', '8', '--out',
                              str(tmp_path / 'preds.pkl'), *SMALL], tmp_path, 'calib')
    fp, q = summary['float']['metrics'], summary['quant']['metrics']
    assert fp['accuracy/top1'] >= 50  # 8 real images, real weights
    assert abs(fp['accuracy/top1'] - q['accuracy/top1']) <= 25
    assert 'calibration batch' in log  # progress is shown
    state = osp.join(work, 'quant_state.safetensors')
    assert osp.isfile(state)
    # Evaluating from the saved state gives identical logits without recalibration.
    summary2, _, log2 = run([cfg, '--quant-state', state, '--out', str(tmp_path / 'preds2.pkl'), *SMALL],
                            tmp_path, 'reload')
    assert 'calibration batch' not in log2
    with open(tmp_path / 'preds.pkl', 'rb') as f:
        first = pickle.load(f)
    with open(tmp_path / 'preds2.pkl', 'rb') as f:
        second = pickle.load(f)
    assert len(first) == len(second) == 8
    for a, b in zip(first, second):
        assert torch.equal(a['pred_score'], b['pred_score'])
    assert summary2['quant']['metrics'] == summary['quant']['metrics']


def _main(argv, monkeypatch):
    monkeypatch.setenv('FQVIT_DATA', osp.abspath(DATA))
    monkeypatch.chdir(ROOT)
    return load_tool('test').main(argv)


@needs_data
@pytest.mark.parametrize('override, key, error', [
    ('quant_cfg.w_bits=12', 'quant_cfg.w_bits', QuantConfigError),
    ('quant_cfg.roles.qq=None', 'quant_cfg.roles.qq', QuantConfigError),
    ('test_dataloader.dataset.data_root=/nonexistent', 'test_dataloader.dataset.data_root', FileNotFoundError),
])
def test_bad_input_fails_early_with_the_key(tmp_path, monkeypatch, override, key, error):
    with pytest.raises(error) as err:
        _main(['configs/cls/deit_tiny_w8a8a4.py', '--work-dir', str(tmp_path), '--cfg-options', override],
              monkeypatch)
    assert key in str(err.value)


@needs_data
def test_missing_checkpoint_is_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='/nope.safetensors'):
        _main(['configs/cls/deit_tiny_w8a8a4.py', '--work-dir', str(tmp_path), '--checkpoint',
               '/nope.safetensors'], monkeypatch)


# --- tiny synthetic config: no shared data, no downloads -------------------------------------------
@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return make_images(str(tmp_path_factory.mktemp('tiny_imagenet')))


def test_tiny_config_through_the_cli_calibrates_saves_and_reloads(tiny_data, tmp_path):
    cfg = write_config(tmp_path / 'tiny.py', tiny_data)
    summary, work, log = run([cfg, '--compare-float', '--out', str(tmp_path / 'preds.pkl')], tmp_path, 'calib')
    assert set(summary) == {'float', 'quant'}
    assert summary['quant']['calib_seconds'] > 0 and summary['float']['calib_seconds'] is None
    assert 'observed 2 calibration batches (4 images)' in log  # 4 calibration images in batches of 2
    assert 'RANDOM weights' in log  # no checkpoint, no pretrained: said, not silent
    state = osp.join(work, 'quant_state.safetensors')
    summary2, _, log2 = run([cfg, '--quant-state', state, '--out', str(tmp_path / 'preds2.pkl')], tmp_path,
                            'reload')
    assert 'calibration batch' not in log2
    with open(tmp_path / 'preds.pkl', 'rb') as f:
        first = pickle.load(f)
    with open(tmp_path / 'preds2.pkl', 'rb') as f:
        second = pickle.load(f)
    assert len(first) == len(second) == 6
    for a, b in zip(first, second):
        assert torch.equal(a['pred_score'], b['pred_score'])
    # The reported top-1 is the one of the dumped quantized predictions (labels: image i -> i % 4).
    hits = sum(int(p['pred_score'].argmax()) == int(p['gt_label']) for p in first)
    assert [int(p['gt_label']) for p in first] == [i % 4 for i in range(6)]
    assert summary['quant']['metrics']['accuracy/top1'] == pytest.approx(100 * hits / 6)
    assert summary2['quant']['metrics'] == summary['quant']['metrics']


def test_classifier_weights_come_from_one_named_source(tiny_data, tmp_path, monkeypatch, caplog):
    import timm
    from safetensors.torch import save_file

    from fqvit_det.mm.cls import QuantizedClassifier

    def no_hub(*args, pretrained=False, **kwargs):
        assert not pretrained, 'a hub download was attempted'
        return real_create(*args, **kwargs)

    real_create = timm.create_model
    monkeypatch.setattr(timm, 'create_model', no_hub)
    with pytest.raises(FileNotFoundError, match='/nope.safetensors'):
        QuantizedClassifier(MODEL, checkpoint='/nope.safetensors')
    # No checkpoint: random weights, said in the log.
    source = QuantizedClassifier(MODEL)
    # A checkpoint that exists is loaded (strictly, timm key names), never replaced.
    path = str(tmp_path / 'w.safetensors')
    save_file({k: v.contiguous() for k, v in source.classifier.model.state_dict().items()}, path)
    loaded = QuantizedClassifier(MODEL, checkpoint=path)
    for key, value in source.classifier.model.state_dict().items():
        assert torch.equal(loaded.classifier.model.state_dict()[key], value), key
    bad = str(tmp_path / 'bad.safetensors')
    save_file({'nothing.weight': torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match='bad.safetensors does not match the model'):
        QuantizedClassifier(MODEL, checkpoint=bad)
