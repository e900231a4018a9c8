#!/usr/bin/env python
"""Evaluate a (quantized) model from an mmengine config: mmdet detectors and mmpretrain classifiers
(mmpretrain's own ViT / DeiT / Swin, or timm models through mmpretrain's TimmClassifier).

    python tools/test.py configs/cascade_swin_s_w8a8a4.py [--checkpoint ckpt.pth]
    python tools/test.py configs/cls/deit_tiny_w8a8a4.py --compare-float
    python tools/test.py configs/cls/mmpretrain_deit_tiny_w8a8a4.py --compare-float

The config's ``quant_cfg`` (top level or inside the model) selects the method; a plain mmdet /
mmpretrain model is wrapped in ``QuantizedDetector`` / ``QuantizedClassifier``, which loads
``load_from`` (or ``--checkpoint``) itself. The model is
calibrated by ``CalibrationHook`` before testing and the calibrated state is saved as
``<work_dir>/quant_state.safetensors``; ``--quant-state`` evaluates from such a file instead.
"""
import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Evaluate a quantized detector or classifier')
    p.add_argument('config', help='config file path')
    p.add_argument('--checkpoint', help='float weights (.safetensors or .pth, loaded weights-only)')
    p.add_argument('--work-dir', help='directory for logs, metrics and the calibrated state')
    p.add_argument('--out', help='dump raw predictions to this pickle file')
    p.add_argument('--show-dir', help='detection: draw predictions into <work_dir>/<show_dir>')
    p.add_argument('--quant-state', help='evaluate from a saved calibrated state (no calibration)')
    p.add_argument('--float', action='store_true', help='evaluate the float model only')
    p.add_argument('--compare-float', action='store_true',
                   help='evaluate the float model first, then the quantized one, and print both; '
                        'for detectors also the agreement AP (quantized predictions scored '
                        'against the float predictions as ground truth)')
    p.add_argument('--integer', action='store_true',
                   help='evaluate the integer model (int8 GEMMs, fqvit_det.integer) built from the '
                        'calibrated one')
    p.add_argument('--exact-arithmetic', action='store_true',
                   help='evaluate the integer-exact simulation (quantized GEMMs on their codes, '
                        'fqvit_det.nn.exact): what --integer computes, without integer kernels')
    p.add_argument('--calib-images', type=int, help='override the number of calibration images')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                   help='override config keys, e.g. test_dataloader.batch_size=2')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


from mmengine.config import Config, DictAction  # noqa: E402


def main(argv=None):
    args = parse_args(argv)
    from fqvit_det.mm.launch import AGREEMENT_FILE, init_distributed, is_detector, prepare_config, run_eval
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg = prepare_config(cfg, checkpoint=args.checkpoint, quant_state=args.quant_state,
                         calib_images=args.calib_images, out=args.out, show_dir=args.show_dir,
                         integer=args.integer, exact_arithmetic=args.exact_arithmetic)
    init_distributed(cfg, args.launcher)
    results = {}
    agreement_file = (osp.join(cfg.work_dir, AGREEMENT_FILE)
                      if args.compare_float and is_detector(cfg) else None)
    if args.compare_float or args.float:
        results['float'] = run_eval(cfg, float_eval=True, agreement_file=agreement_file)
    if not args.float:
        key = 'integer' if args.integer else 'quant'
        results[key] = run_eval(cfg, float_eval=False, agreement_file=agreement_file)
        if 'agreement' in results[key]:
            results['agreement'] = dict(metrics=results[key].pop('agreement'))
    summary_path = osp.join(cfg.work_dir, 'summary.json')
    if int(os.environ.get('RANK', '0')) == 0:
        os.makedirs(cfg.work_dir, exist_ok=True)
        with open(summary_path + '.tmp', 'w') as f:
            json.dump(results, f, indent=2)
        os.replace(summary_path + '.tmp', summary_path)
        print('\n==== fqvit-det summary ({}) ====' .format(osp.basename(args.config)))
        for kind, res in results.items():
            metrics = ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                for k, v in res['metrics'].items())
            if kind == 'agreement':  # quantized vs float predictions, no timings of its own
                print(f'agree : {metrics} (quantized vs float predictions)')
                continue
            print(f'{kind:>6}: {metrics} | eval {res["eval_seconds"]:.1f}s'
                  + (f' | calibration {res["calib_seconds"]:.1f}s' if res.get('calib_seconds') else ''))
        print(f'summary: {summary_path}')
    return results


if __name__ == '__main__':
    from fqvit_det.mm.launch import close_distributed
    try:
        main()
    finally:
        close_distributed()
