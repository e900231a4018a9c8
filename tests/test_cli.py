"""``tools/test.py`` end to end on a tiny synthetic classification setup (no shared data).

``tests/configs/tiny_vit_*.py`` read images and weights from ``$FQVIT_TINY``, written here: 12
random 32x32 PNGs in 4 class folders and a 2-block timm ``test_vit``. Covers float / quantized /
``--compare-float`` runs, reloading ``--quant-state``, early errors for missing paths, and
``torchrun --nproc_per_node 2 ... --launcher pytorch`` (gloo on this CPU-only run) ending with
the state file of one process, bit for bit.
"""
import json
import os
import os.path as osp
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from .helpers import ROOT

CONFIGS = {'fqvit': 'tests/configs/tiny_vit_fqvit.py', 'ptq4vit': 'tests/configs/tiny_vit_ptq4vit.py'}
STATE = 'quant_state.safetensors'


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    import timm
    from PIL import Image
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp('tiny')
    rng = np.random.default_rng(0)
    for c in range(4):
        folder = root / 'images' / f'class{c}'
        folder.mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            pixels[..., c % 3] //= 4  # a little class signal
            Image.fromarray(pixels).save(folder / f'{i}.png')
    torch.manual_seed(0)
    model = timm.create_model('test_vit', pretrained=False, depth=2, num_classes=4)
    with torch.no_grad():  # see tests/helpers.tiny_vit: give the cls token / positions real scale
        model.cls_token.normal_(std=0.5)
        model.pos_embed.normal_(std=0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / 'weights.safetensors'))
    return str(root)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_cli(tiny_root, work, *args, nproc=None, check=True):
    env = dict(os.environ, FQVIT_TINY=tiny_root, PYTHONPATH=ROOT, OMP_NUM_THREADS='1',
               CUDA_VISIBLE_DEVICES='')
    tool = osp.join(ROOT, 'tools', 'test.py')
    if nproc:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
               '--master_port', str(_free_port()), tool, *args, '--launcher', 'pytorch']
    else:
        cmd = [sys.executable, tool, *args]
    proc = subprocess.run(cmd + ['--work-dir', str(work)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, log[-4000:]
    return proc, log


def summary(work):
    with open(osp.join(work, 'summary.json')) as f:
        return json.load(f)


def state_tensors(path):
    from safetensors.torch import load_file
    return load_file(path)


_single = {}


def single_process(name, tiny_root, tmp_path_factory):
    """One-process calibration of ``CONFIGS[name]`` (run once per module)."""
    if name not in _single:
        work = tmp_path_factory.mktemp(f'single_{name}')
        _, log = run_cli(tiny_root, work, CONFIGS[name], '--compare-float', '--out',
                         str(work / 'preds.pkl'))
        _single[name] = (work, log)
    return _single[name]


def test_compare_float_calibrates_saves_and_reports(tiny_root, tmp_path_factory):
    work, log = single_process('fqvit', tiny_root, tmp_path_factory)
    s = summary(work)
    for kind in ('float', 'quant'):
        assert 0.0 <= s[kind]['metrics']['accuracy/top1'] <= 100.0
    calib = s['quant']['calibration']
    assert calib['images'] == 10 and calib['world_size'] == 1 and calib['rank_images'] == 10
    assert calib['rank_batches'] == 3 and calib['seconds']['total'] > 0
    assert 'search_report' not in calib  # fqvit does not search
    assert s['float']['calibration'] is None
    assert osp.isfile(osp.join(work, STATE))
    assert 'calibration: 10 of 10 images' in log


def test_float_only_run(tiny_root, tmp_path):
    _, log = run_cli(tiny_root, tmp_path, CONFIGS['fqvit'], '--float')
    s = summary(tmp_path)
    assert set(s) == {'float'} and 'accuracy/top1' in s['float']['metrics']
    assert not osp.exists(osp.join(tmp_path, STATE))


def test_quant_state_reload_gives_identical_results(tiny_root, tmp_path, tmp_path_factory):
    work, _ = single_process('fqvit', tiny_root, tmp_path_factory)
    _, log = run_cli(tiny_root, tmp_path, CONFIGS['fqvit'], '--quant-state', osp.join(work, STATE),
                     '--out', str(tmp_path / 'preds.pkl'))
    assert 'loaded calibrated state' in log and 'observed' not in log
    assert summary(tmp_path)['quant']['metrics'] == summary(work)['quant']['metrics']
    with open(work / 'preds.pkl', 'rb') as f:
        first = pickle.load(f)
    with open(tmp_path / 'preds.pkl', 'rb') as f:
        again = pickle.load(f)
    assert len(first) == len(again) == 12
    for a, b in zip(first, again):
        assert torch.equal(a['pred_score'], b['pred_score'])


@pytest.mark.parametrize('flag', ['--quant-state', '--checkpoint'])
def test_missing_path_fails_early_naming_the_flag(flag, tiny_root, tmp_path):
    missing = str(tmp_path / 'missing.safetensors')
    proc, log = run_cli(tiny_root, tmp_path / 'work', CONFIGS['fqvit'], flag, missing, check=False)
    assert proc.returncode != 0
    assert flag in log and missing in log
    assert 'calibration' not in proc.stdout  # failed before any model work


@pytest.mark.parametrize('name', ['fqvit', 'ptq4vit'])
def test_torchrun_two_processes_equal_one(name, tiny_root, tmp_path, tmp_path_factory):
    single, _ = single_process(name, tiny_root, tmp_path_factory)
    _, log = run_cli(tiny_root, tmp_path, CONFIGS[name], nproc=2)
    assert 'rank 0/2: 6 of 10 images' in log and 'rank 1/2: 4 of 10 images' in log
    s = summary(tmp_path)
    assert s['quant']['calibration']['world_size'] == 2
    if name == 'ptq4vit':  # the search report of rank 0 reaches summary.json
        report = s['quant']['calibration']['search_report']
        alone = summary(single)['quant']['calibration']['search_report']
        assert report['search'] == 'hessian' and report['modules']
        assert report['images'] == alone['images'] == 10
        untimed = lambda rep: {m: {k: v for k, v in r.items() if k != 'seconds'}  # noqa: E731
                               for m, r in rep['modules'].items()}
        assert untimed(report) == untimed(alone)
    assert s['quant']['metrics'] == summary(single)['quant']['metrics']
    want, got = state_tensors(osp.join(single, STATE)), state_tensors(osp.join(tmp_path, STATE))
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), f'{k}: 2 processes differ from 1'
