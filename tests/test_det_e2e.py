"""tools/test.py on real coco_mini images with a small Swin at reduced resolution (CPU budget)."""
import json
import os
import os.path as osp
import pickle
import re
import subprocess
import sys

import pytest

from .helpers import DATA, HAS_COCO, ROOT  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_COCO, reason=f'coco_mini not found under {DATA}')

SMALL_SWIN = [
    'model.backbone.embed_dims=32', 'model.backbone.depths=[1,1,1,1]', 'model.backbone.num_heads=[1,2,2,4]',
    'model.neck.in_channels=[32,64,128,256]',
    'test_dataloader.dataset.indices=3', 'test_dataloader.num_workers=0', 'calib_dataloader.num_workers=0',
    'test_dataloader.dataset.pipeline.1.scale=(320,192)', 'calib_dataloader.dataset.pipeline.1.scale=(320,192)',
    # Random weights score every class ~1/81: keep low-score boxes so the metrics have input.
    'model.test_cfg.rcnn.score_thr=0.0', 'model.test_cfg.rcnn.max_per_img=20',
]


def run(config, work, *extra):
    env = dict(os.environ, FQVIT_DATA=osp.abspath(DATA), PYTHONPATH=ROOT)
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'test.py'), config, '--work-dir', work, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    with open(osp.join(work, 'summary.json')) as f:
        return json.load(f), proc.stdout + proc.stderr


def test_mask_rcnn_float_and_quantized_then_reload(tmp_path):
    cfg = 'configs/mask_rcnn_swin_t_w8a8a4.py'
    work = str(tmp_path / 'calib')
    summary, log = run(cfg, work, '--compare-float', '--calib-images', '2', '--out', str(tmp_path / 'a.pkl'),
                       '--cfg-options', *SMALL_SWIN)
    for kind in ('float', 'quant'):
        metrics = summary[kind]['metrics']
        assert 'coco/bbox_mAP' in metrics and 'coco/segm_mAP' in metrics, metrics
    # Agreement AP of the random-weight detector: no float score reaches 0.3, so every float
    # prediction is pseudo ground truth; masks get their own AP.
    agreement = summary['agreement']['metrics']
    assert agreement['gt_score_thr'] == 0.0 and agreement['num_pseudo_gt'] > 0, agreement
    for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP'):
        assert 0.0 <= agreement[key] <= 1.0, agreement
    assert 'agree : bbox_mAP=' in log
    assert 'calibration: 2 of 2 images' in log  # the progress shows the calibration share
    state = osp.join(work, 'quant_state.safetensors')
    assert osp.isfile(state)
    summary2, log2 = run(cfg, str(tmp_path / 'reload'), '--quant-state', state, '--out', str(tmp_path / 'b.pkl'),
                         '--cfg-options', *SMALL_SWIN)
    assert 'calibration batch' not in log2
    with open(tmp_path / 'a.pkl', 'rb') as f:
        first = pickle.load(f)
    with open(tmp_path / 'b.pkl', 'rb') as f:
        second = pickle.load(f)
    assert len(first) == len(second) == 3
    for a, b in zip(first, second):
        pa, pb = a['pred_instances'], b['pred_instances']
        assert (pa['bboxes'] == pb['bboxes']).all() and (pa['scores'] == pb['scores']).all()
        assert (pa['labels'] == pb['labels']).all()
    assert summary2['quant']['metrics'] == summary['quant']['metrics']


def test_missing_dataset_fails_early(tmp_path):
    env = dict(os.environ, FQVIT_DATA=str(tmp_path / 'nowhere'), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'test.py'), 'configs/cascade_swin_s_w8a8a4.py',
                           '--work-dir', str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert 'test_dataloader.dataset.data_root' in proc.stderr and 'nowhere' in proc.stderr


def test_integer_detector_equals_the_integer_exact_simulation(tmp_path):
    """``--integer`` on a Swin Mask R-CNN: int8 GEMMs for the backbone / RoI-head Linears and the
    patch embedding, the rest simulated on codes; boxes, scores and masks equal the
    ``--exact-arithmetic`` simulation's bit for bit."""
    cfg = 'configs/mask_rcnn_swin_t_w4a4.py'
    work = str(tmp_path / 'calib')
    run(cfg, work, '--calib-images', '2', '--cfg-options', *SMALL_SWIN)
    state = osp.join(work, 'quant_state.safetensors')
    outs, logs = {}, {}
    for flag in ('--integer', '--exact-arithmetic'):
        _, logs[flag] = run(cfg, str(tmp_path / flag[2:]), '--quant-state', state, flag,
                            '--out', str(tmp_path / f'{flag[2:]}.pkl'), '--cfg-options', *SMALL_SWIN)
        with open(tmp_path / f'{flag[2:]}.pkl', 'rb') as f:
            outs[flag] = pickle.load(f)
    assert re.search(r'to_integer: [1-9]\d* integer GEMM modules', logs['--integer'])
    assert 'evaluating the integer model' in logs['--integer']
    assert 'integer-exact arithmetic in' in logs['--exact-arithmetic']
    assert len(outs['--integer']) == len(outs['--exact-arithmetic']) == 3
    for a, b in zip(outs['--integer'], outs['--exact-arithmetic']):
        pa, pb = a['pred_instances'], b['pred_instances']
        assert len(pa['scores']) > 0
        for key in ('bboxes', 'scores', 'labels'):
            assert (pa[key] == pb[key]).all(), key
        assert [m['counts'] for m in pa['masks']] == [m['counts'] for m in pb['masks']]
