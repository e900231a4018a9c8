"""The classification config end to end through tools/test.py on real images (when present)."""
import json
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest

from .helpers import DATA, HAS_DATA, ROOT

pytestmark = pytest.mark.skipif(not HAS_DATA, reason=f'real data not found at {DATA}')
SMALL = ['--cfg-options', 'test_dataloader.dataset.max_images=8', 'test_dataloader.batch_size=4',
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


def test_deit_tiny_config_calibrates_evaluates_and_reloads(tmp_path):
    cfg = 'configs/cls/deit_tiny_w8a8a4.py'
    summary, work, log = run([cfg, '--compare-float', '--calib-images', '8', '--out',
                              str(tmp_path / 'preds.pkl'), *SMALL], tmp_path, 'calib')
    fp, q = summary['float']['metrics'], summary['quant']['metrics']
    assert 0 <= q['imagenet/top1'] <= 100 and fp['imagenet/top1'] >= 50  # 8 real images, real weights
    assert abs(fp['imagenet/top1'] - q['imagenet/top1']) <= 25
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
        assert (a['logits'] == b['logits']).all()
    assert summary2['quant']['metrics'] == summary['quant']['metrics']


def _main(argv, monkeypatch):
    monkeypatch.setenv('FQVIT_DATA', osp.abspath(DATA))
    monkeypatch.chdir(ROOT)
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import test as test_tool
    return test_tool.main(argv)


@pytest.mark.parametrize('override, key', [
    ('quant_cfg.w_bits=12', 'quant_cfg.w_bits'),
    ('quant_cfg.roles.qq=None', 'quant_cfg.roles.qq'),
    ('test_dataloader.dataset.data_root=/nonexistent', 'data_root'),
])
def test_bad_input_fails_early_with_the_key(tmp_path, monkeypatch, override, key):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        _main(['configs/cls/deit_tiny_w8a8a4.py', '--work-dir', str(tmp_path), '--cfg-options', override],
              monkeypatch)
    assert key in str(err.value)


def test_missing_checkpoint_is_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='/nope.safetensors'):
        _main(['configs/cls/deit_tiny_w8a8a4.py', '--work-dir', str(tmp_path), '--checkpoint',
               '/nope.safetensors'], monkeypatch)
