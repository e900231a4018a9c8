#!/usr/bin/env python
"""The README's main job: quantize and evaluate on the real data in $FQVIT_DATA (../shared/data).

1. Classification: DeiT-Tiny (real ImageNet weights), FQ-ViT 8/8/4 (MinMax + PTF + LIS), calibrated
   on imagenet/calib1000, evaluated on all 1,300 imagenet/val1300 images: float vs quantized top-1.
2. Detection (the used-by command): ``tools/test.py configs/cascade_swin_s_w8a8a4.py`` on coco_mini,
   float and quantized COCO metrics side by side. Pass ``--det-checkpoint`` (or set
   FQVIT_DET_CHECKPOINT) to evaluate real detector weights; without one the detector has random
   weights and its mAP says nothing about quantization quality (it only proves the pipeline runs).
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_test(config, work_dir, extra=()):
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'test.py'), config, '--compare-float',
           '--work-dir', work_dir, *extra]
    print('$', ' '.join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(osp.join(work_dir, 'summary.json')) as f:
        return json.load(f), time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--cls-config', default='configs/cls/deit_tiny_w8a8a4.py')
    p.add_argument('--det-config', default='configs/cascade_swin_s_w8a8a4.py')
    p.add_argument('--det-checkpoint', default=os.environ.get('FQVIT_DET_CHECKPOINT'))
    p.add_argument('--skip-det', action='store_true')
    p.add_argument('--work-dir', default='work_dirs/main_job')
    args = p.parse_args(argv)
    data = os.environ.get('FQVIT_DATA', osp.join(ROOT, '..', 'shared', 'data'))
    if not osp.isdir(data):
        raise SystemExit(f'data folder {data!r} not found: set FQVIT_DATA to the folder holding '
                         'imagenet/ and coco_mini/')
    os.environ['FQVIT_DATA'] = osp.abspath(data)
    lines = []
    cls, secs = run_test(args.cls_config, osp.join(args.work_dir, 'cls'))
    f, q = cls['float']['metrics'], cls['quant']['metrics']
    lines.append(f'DeiT-Tiny ImageNet val1300 ({args.cls_config}): float top-1 {f["accuracy/top1"]:.2f} | '
                 f'quantized top-1 {q["accuracy/top1"]:.2f} (drop {f["accuracy/top1"] - q["accuracy/top1"]:.2f}) '
                 f'| calibration {cls["quant"]["calib_seconds"]:.0f}s, float eval {cls["float"]["eval_seconds"]:.0f}s, '
                 f'quantized eval {cls["quant"]["eval_seconds"]:.0f}s, total {secs:.0f}s')
    if not args.skip_det:
        extra = ['--checkpoint', args.det_checkpoint] if args.det_checkpoint else []
        det, secs = run_test(args.det_config, osp.join(args.work_dir, 'det'), extra)
        f, q = det['float']['metrics'], det['quant']['metrics']
        keys = [k for k in ('coco/bbox_mAP', 'coco/segm_mAP') if k in f]
        lines.append(f'{args.det_config} on coco_mini val2017: ' + ', '.join(
            f'{k} float {f[k]:.3f} / quantized {q[k]:.3f}' for k in keys)
            + f' | calibration {det["quant"]["calib_seconds"]:.0f}s, float eval '
              f'{det["float"]["eval_seconds"]:.0f}s, quantized eval {det["quant"]["eval_seconds"]:.0f}s')
        if not args.det_checkpoint:
            lines.append('NOTE: no detector checkpoint was given, so the detector has RANDOM weights: '
                         'these mAPs only show that calibration and evaluation run end to end; they '
                         'say nothing about accuracy. Pass --det-checkpoint (see README) for real numbers.')
    print('\n==== fqvit-det main job ====')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
