#!/usr/bin/env python
"""Detection benchmarks on coco_mini (real COCO images and official annotations).

    python benchmarks/det_benchmark.py [--data ../shared/data] [--val-images 79] [--skip-timing]

1. Wall time of calibrate + evaluate for Cascade Mask R-CNN Swin-S at w8a8a4 (full test
   resolution), relative to the float evaluation of the same images (target ≤ 1.6×).
2. Backbone-feature SQNR, float vs quantized, of the DeiT-Tiny-backbone Mask R-CNN (real DeiT-Tiny
   weights) at w8a8a4, w6a6, w4a4 (target ≥ 30 dB at 8 bits).
No pretrained Swin detector is obtainable here, so no mAP is reported as accuracy: the Swin
detector runs with random weights and only its timing is meaningful.
Writes benchmarks/results/det_benchmark.json and benchmarks/RESULTS.md.
"""
import argparse
import datetime
import json
import os
import os.path as osp
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from results_md import load_result, machine_info, save_result  # noqa: E402


SQNR_CONFIGS = [f'configs/mask_rcnn_deit_tiny_{b}.py' for b in ('w8a8a4', 'w6a6', 'w4a4')]


def timing(args):
    if args.timing_from:
        # The same measurement taken by an earlier `tools/test.py configs/cascade_swin_s_w8a8a4.py
        # --compare-float` run (e.g. the README main job), read from its summary.json.
        with open(args.timing_from) as f:
            res = json.load(f)
        if 'float' not in res or 'quant' not in res:
            raise SystemExit(f'{args.timing_from}: expected the summary.json of a --compare-float run')
        total = None
        source = ('python tools/test.py configs/cascade_swin_s_w8a8a4.py --compare-float '
                  f'(its summary.json: {args.timing_from})')
    else:
        sys.path.insert(0, osp.join(ROOT, 'tools'))
        import test as test_tool
        work = osp.join(ROOT, 'work_dirs', 'bench_cascade_swin_s_w8a8a4')
        argv = ['configs/cascade_swin_s_w8a8a4.py', '--compare-float', '--work-dir', work,
                '--cfg-options', f'test_dataloader.dataset.indices={args.val_images}']
        t0 = time.time()
        res = test_tool.main(argv)
        total = time.time() - t0
        source = 'python tools/test.py ' + ' '.join(argv)
    fe, qe, qc = res['float']['eval_seconds'], res['quant']['eval_seconds'], res['quant']['calib_seconds']
    return dict(val_images=args.val_images, calib_images=8, float_eval_seconds=fe, quant_eval_seconds=qe,
                calib_seconds=qc, ratio=(qe + qc) / fe, total_seconds=total, source=source,
                float_metrics=res['float']['metrics'], quant_metrics=res['quant']['metrics'])


def backbone_sqnr(config, images):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner
    from fqvit_det.calibration import CalibrationRunner, set_quant_mode
    from fqvit_det.mm.hooks import take_images
    from fqvit_det.mm.launch import prepare_config
    cfg = prepare_config(Config.fromfile(osp.join(ROOT, config)))
    for key in ('calib_dataloader', 'test_dataloader'):  # 8 + 8 images: worker processes only cost memory
        cfg[key].update(num_workers=0, persistent_workers=False)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model).eval()
    det = model.quant_target
    calib = list(take_images(Runner.build_dataloader(cfg.calib_dataloader), model.quant_spec.calib_images))
    t0 = time.time()
    CalibrationRunner(det, model.quant_spec, forward_fn=model.calib_forward, progress=False).run(calib)
    calib_s = time.time() - t0
    loader = Runner.build_dataloader(cfg.test_dataloader)
    signal = noise = 0.0
    per_level = None
    with torch.no_grad():
        for batch in take_images(loader, images):
            inputs = det.data_preprocessor(batch, False)['inputs']
            set_quant_mode(det, 'float')
            ref = det.backbone(inputs)
            set_quant_mode(det, 'quant')
            out = det.backbone(inputs)
            if per_level is None:
                per_level = [[0.0, 0.0] for _ in ref]
            for lvl, (r, o) in enumerate(zip(ref, out)):
                s, n = r.double().pow(2).sum().item(), (r - o).double().pow(2).sum().item()
                per_level[lvl][0] += s
                per_level[lvl][1] += n
                signal += s
                noise += n
    import math
    db = lambda s, n: float('inf') if n == 0 else 10 * math.log10(s / n)  # noqa: E731
    return dict(config=config, method=model.quant_spec.method, bits=f'{model.quant_spec.w_bits}/'
                f'{model.quant_spec.a_bits}/{model.quant_spec.attn_bits}', eval_images=images,
                calib_images=len(calib), calib_seconds=calib_s, sqnr_db=db(signal, noise),
                sqnr_db_per_level=[db(s, n) for s, n in per_level])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=osp.join(ROOT, '..', 'shared', 'data'))
    p.add_argument('--val-images', type=int, default=79)
    p.add_argument('--sqnr-images', type=int, default=8)
    p.add_argument('--skip-timing', action='store_true')
    p.add_argument('--skip-sqnr', action='store_true', help='keep the SQNR rows of the previous run')
    p.add_argument('--sqnr-configs', nargs='+', metavar='CONFIG', default=SQNR_CONFIGS,
                   help='detector configs whose backbone SQNR to (re)measure; rows of other configs '
                        'from the previous run are kept')
    p.add_argument('--timing-from', metavar='SUMMARY_JSON',
                   help='take the timing from the summary.json of an earlier `tools/test.py '
                        'configs/cascade_swin_s_w8a8a4.py --compare-float` run over --val-images images')
    args = p.parse_args(argv)
    if not osp.isdir(osp.join(args.data, 'coco_mini')):
        raise SystemExit(f'coco_mini not found under {args.data}')
    os.environ['FQVIT_DATA'] = osp.abspath(args.data)
    os.chdir(ROOT)
    doc = load_result('det_benchmark.json') or {}
    doc.update(command='python benchmarks/det_benchmark.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
               machine=machine_info(),
               date=datetime.date.today().isoformat())
    if not args.skip_sqnr:
        if args.sqnr_configs == SQNR_CONFIGS:
            doc['sqnr_command'] = doc['command']
        new = [backbone_sqnr(c, args.sqnr_images) for c in args.sqnr_configs]
        done = {r['config'] for r in new}
        for r in new:
            r['command'] = doc['command']
        doc['sqnr'] = [r for r in doc.get('sqnr', []) if r['config'] not in done] + new
    for r in doc.get('sqnr', []):
        print(f'{r["config"]}: backbone SQNR {r["sqnr_db"]:.1f} dB (levels '
              + ', '.join(f'{x:.1f}' for x in r['sqnr_db_per_level']) + ')', flush=True)
    if not args.skip_timing:
        doc['timing'] = timing(args)
        doc['timing_command'] = doc['command']
        print(f'cascade swin-s w8a8a4: (calib + quant eval) / float eval = {doc["timing"]["ratio"]:.2f}', flush=True)
    n_sqnr = doc['sqnr'][0]['eval_images'] if doc.get('sqnr') else args.sqnr_images
    md = ['### Backbone-feature fidelity, Mask R-CNN with the real DeiT-Tiny backbone',
          '', 'Command: ' + ', '.join(f'`{c}`' for c in dict.fromkeys(
              [doc.get('sqnr_command', doc['command'])]
              + [r['command'] for r in doc.get('sqnr', []) if r.get('command')]))
          + ' (a row with its own command in the JSON came from that one). Calibrated on coco_mini train2017 (8 images, test pipeline), SQNR of the four pyramid '
          f'features over {n_sqnr} val2017 images at full test resolution (1333×800). Target ≥ 30 dB at 8 bits.', '',
          '| config | method | bits (W/A/attn) | SQNR dB (all levels) | per level (stride 4, 8, 16, 32) | calib s |',
          '|---|---|---|---|---|---|']
    for r in doc.get('sqnr', []):
        md.append(f'| {r["config"]} | {r["method"]} | {r["bits"]} | {r["sqnr_db"]:.1f} | '
                  + ', '.join(f'{x:.1f}' for x in r['sqnr_db_per_level']) + f' | {r["calib_seconds"]:.1f} |')
    if doc.get('sqnr'):
        md += ['', 'The ≥ 30 dB target is missed. The conversion itself is exact (113 dB with every quantizer '
               'off, see the diagnosis below); the loss is per-tensor activation quantization: the SQNR '
               'falls block by block, and even with every activation and weight at 16 bits the final '
               'features reach only ~34 dB, because rare very large activations set the per-tensor ranges. '
               'The pyramid, neck and heads of this detector are untrained, so its mAP is not reported.']
    t = doc.get('timing')
    if t:
        md += ['', '### Wall time: Cascade Mask R-CNN Swin-S, w8a8a4 (FQ-ViT PTF + LIS), full resolution', '',
               f'Measured by `{t["source"]}`: {t["val_images"]} val2017 images, calibration on {t["calib_images"]} train2017 images. '
               'Target: (calibration + quantized evaluation) ≤ 1.6 × float evaluation.', '',
               '| float eval s | calibration s | quantized eval s | ratio |', '|---|---|---|---|',
               f'| {t["float_eval_seconds"]:.0f} | {t["calib_seconds"]:.0f} | {t["quant_eval_seconds"]:.0f} | '
               f'{t["ratio"]:.2f} |', '',
               'No pretrained Swin detector can be obtained on these machines: this detector has random '
               'weights, so its mAP (≈ 0) is not reported as accuracy.']
    doc['markdown'] = md
    print(save_result('det_benchmark.json', doc))


if __name__ == '__main__':
    main()
