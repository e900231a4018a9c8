#!/usr/bin/env python
"""Per-block SQNR of the DeiT-Tiny detector backbone, class token and patch tokens separately.

    python benchmarks/vit_block_sqnr.py --mixes repq,dyn --bits 8,6,4 [--calib 32] [--test 8]
        [--scale 1333,800] [--config configs/mask_rcnn_deit_tiny_w6a6.py]

Builds the Mask R-CNN DeiT-Tiny of ``--config`` (its data pipeline; full test resolution by
default) once per (mix, bits) with ``quant_cfg`` = the mix of ``benchmarks/dyn_mixes.py`` and
``scope='backbone'`` (the backbone's quantizers are the same as with scope 'full'), calibrates on the
first ``--calib`` coco_mini train2017 images through the backbone, and reports on the first
``--test`` val2017 images: the SQNR of the four pyramid features (as benchmarks/det_benchmark.py),
and after each of the 12 blocks the SQNR of the class token and of the patch tokens.
Appends to benchmarks/results/vit_block_sqnr.json.
"""
import argparse
import datetime
import math
import os
import os.path as osp
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from dyn_mixes import MIXES, MMDET_NORM  # noqa: E402
from results_md import load_result, machine_info, save_result  # noqa: E402


def db(s, n):
    return float('inf') if n == 0 else 10 * math.log10(s / n)


def build(cfg_path, quant_cfg, scale):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from fqvit_det.mm.launch import prepare_config
    cfg = Config.fromfile(osp.join(ROOT, cfg_path))
    if scale:
        for key in ('calib_dataloader', 'test_dataloader'):
            cfg[key].dataset.pipeline[1].scale = scale
    cfg.quant_cfg = dict(quant_cfg, scope='backbone')
    cfg = prepare_config(cfg)
    init_default_scope('mmdet')
    torch.manual_seed(0)  # the untrained pyramid convs: the same random weights in every build
    return cfg, MODELS.build(cfg.model).eval()


def images(cfg, model, key, n):
    from mmengine.runner import Runner
    from fqvit_det.mm.hooks import take_images
    det = model.quant_target
    with torch.no_grad():
        return [det.data_preprocessor(b, False)['inputs']
                for b in take_images(Runner.build_dataloader(cfg[key]), n)]


def run_backbone(det, x):
    """(per-block outputs, pyramid features) of the backbone on ``x``."""
    acts = {}
    blocks = det.backbone.vit.blocks
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
             for n, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            feats = det.backbone(x)
    finally:
        for h in hooks:
            h.remove()
    return [acts[n] for n in range(len(blocks))], list(feats)


def measure(det, test, refs):
    from fqvit_det.calibration import set_quant_mode
    set_quant_mode(det, 'quant')
    nb = len(refs[0][0])
    cls_sn = [[0.0, 0.0] for _ in range(nb)]
    tok_sn = [[0.0, 0.0] for _ in range(nb)]
    feat_sn = [0.0, 0.0]
    for x, (rb, rf) in zip(test, refs):
        qb, qf = run_backbone(det, x)
        for n, (r, q) in enumerate(zip(rb, qb)):
            for acc, sl in ((cls_sn, slice(0, 1)), (tok_sn, slice(1, None))):
                rr, qq = r[:, sl].double(), q[:, sl].double()
                acc[n][0] += rr.pow(2).sum().item()
                acc[n][1] += (rr - qq).pow(2).sum().item()
        for r, q in zip(rf, qf):
            feat_sn[0] += r.double().pow(2).sum().item()
            feat_sn[1] += (r.double() - q.double()).pow(2).sum().item()
    return dict(features_db=db(*feat_sn), cls_db=[db(*v) for v in cls_sn],
                patch_db=[db(*v) for v in tok_sn])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=osp.join(ROOT, '..', 'shared', 'data'))
    p.add_argument('--config', default='configs/mask_rcnn_deit_tiny_w6a6.py',
                   help='detector config whose model and data pipeline are used')
    p.add_argument('--mixes', default='repq,dyn', help=f'comma list of {sorted(MIXES)}')
    p.add_argument('--bits', default='8,6,4')
    p.add_argument('--calib', type=int, default=32)
    p.add_argument('--test', type=int, default=8)
    p.add_argument('--scale', default=None, help='W,H resize scale (default: the config\'s, 1333,800)')
    p.add_argument('--tag', default='', help='label stored with the rows (e.g. "screen")')
    args = p.parse_args(argv)
    os.environ['FQVIT_DATA'] = osp.abspath(args.data)
    os.chdir(ROOT)
    mixes = args.mixes.split(',')
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        raise SystemExit(f'unknown mixes {unknown}; choose from {sorted(MIXES)}')
    scale = tuple(int(v) for v in args.scale.split(',')) if args.scale else None
    bits = [int(b) for b in args.bits.split(',')]
    cfg, model = build(args.config, MIXES[mixes[0]](bits[0], MMDET_NORM), scale)
    t0 = time.time()
    calib = images(cfg, model, 'calib_dataloader', args.calib)
    test = images(cfg, model, 'test_dataloader', args.test)
    from fqvit_det.calibration import CalibrationRunner, set_quant_mode
    set_quant_mode(model.quant_target, 'float')
    refs = [run_backbone(model.quant_target, x) for x in test]
    print(f'{len(calib)} calibration / {len(test)} test images {tuple(test[0].shape[-2:])}, '
          f'float reference in {time.time() - t0:.0f}s', flush=True)
    for b in bits:
        for name in mixes:
            qcfg = MIXES[name](b, MMDET_NORM)
            cfg, model = build(args.config, qcfg, scale)
            det = model.quant_target
            t1 = time.time()
            CalibrationRunner(det, model.quant_spec, progress=False,
                              forward_fn=lambda m, x: m.backbone(x)).run(calib)
            calib_s = time.time() - t1
            res = measure(det, test, refs)
            row = dict(mix=name, bits=b, quant_cfg=qcfg, calib_images=len(calib), test_images=len(test),
                       input_hw=list(test[0].shape[-2:]), calib_seconds=calib_s, tag=args.tag,
                       date=datetime.date.today().isoformat(), **res)
            doc = load_result('vit_block_sqnr.json') or dict(rows=[])   # other runs may have saved
            doc['rows'] = [r for r in doc['rows'] if not (r['mix'] == name and r['bits'] == b
                                                          and r.get('tag', '') == args.tag
                                                          and r['input_hw'] == row['input_hw'])]
            doc['rows'].append(row)
            print(f'{name} w{b}a{b}: features {res["features_db"]:.1f} dB | cls last '
                  f'{res["cls_db"][-1]:.1f} patch last {res["patch_db"][-1]:.1f} | cls '
                  + ' '.join(f'{v:.1f}' for v in res['cls_db']) + ' | patch '
                  + ' '.join(f'{v:.1f}' for v in res['patch_db']) + f' | calib {calib_s:.0f}s',
                  flush=True)
            doc.update(command='python benchmarks/vit_block_sqnr.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
                       machine=machine_info())
            save_result('vit_block_sqnr.json', doc)


if __name__ == '__main__':
    main()


def _fmt(v):
    return f'{v:.1f}'


def dyn_section(doc, cls_screen=None):
    """RESULTS.md section: the dynamic-activation mixes (issue 11 §2)."""
    out = ['## Dynamic activations: a plain-ViT backbone at 8 / 6 / 4 bits (issue 11 §2)', '',
           f'Command: `{doc.get("command")}` (rows name their settings).  ', f'Machine: {doc.get("machine")}.', '',
           'Mixes (`benchmarks/dyn_mixes.py`): `repq` = the RepQ-ViT preset; `+pixel` = the image on its '
           'uint8 pixel grid (`PixelInputQuantizer`); `+tokens` = `DynamicQuantizer` per token on '
           'ln_output / proj_input / fc2_input / head_input, q, k per token, v per channel (reparam off); '
           '`+rowprobs` = `DynamicSoftmaxQuantizer` (uniform, scale per attention row); `dyn` = all three; '
           '`_g32` = groups of 32 channels instead of whole tokens; `_rowlog` = per-row log√2 probabilities; '
           '`_gptq` = `GPTQWeightQuantizer` (act_order) on the Linear and patch-embedding weights; '
           '`weights_only` / `_wfloat` = every activation / every weight float. SQNR of the four pyramid '
           'features ("features"), and of the class token and the patch tokens after the last block; '
           'per block in the JSON (`benchmarks/results/vit_block_sqnr.json`).', '']
    rows = doc.get('rows', [])
    for tag, title in (('full', 'Full test resolution (1333×800 resize)'),
                       ('screen', 'Screening: 640×384 resize, 2 val images, 8 calibration images')):
        sel = [r for r in rows if r.get('tag') == tag]
        if not sel:
            continue
        out += [f'### {title}', '',
                '| mix | W/A bits | input | calib / test images | features dB | class token dB | patch tokens dB |',
                '|---|---|---|---|---|---|---|']
        for r in sorted(sel, key=lambda r: (-r['bits'], r['mix'])):
            out.append(f'| {r["mix"]} | {r["bits"]} | {r["input_hw"][1]}×{r["input_hw"][0]} | '
                       f'{r["calib_images"]} / {r["test_images"]} | {_fmt(r["features_db"])} | '
                       f'{_fmt(r["cls_db"][-1])} | {_fmt(r["patch_db"][-1])} |')
        out.append('')
        if tag == 'full':
            out += ['Per block (after block 1 … 12), class token / patch tokens:', '']
            for r in sorted(sel, key=lambda r: (-r['bits'], r['mix'])):
                out.append(f'- {r["mix"]} W{r["bits"]}A{r["bits"]}: class '
                           + ', '.join(map(_fmt, r['cls_db'])) + ' · patch '
                           + ', '.join(map(_fmt, r['patch_db'])))
            out.append('')
    if cls_screen:
        out += [f'### Classification screening: DeiT-Tiny top-1 on the first {cls_screen["val_images"]} '
                'val1300 images', '', 'Command: `benchmarks/cls_fidelity.py --out cls_screen_dyn.json` '
                '(rows `<mix>@w<bits>`, 32 calibration images).', '',
                '| mix | bits | top-1 | drop |', '|---|---|---|---|']
        for r in cls_screen['records']:
            out.append(f'| {r["method"]} | {r["bits"]} | {r["top1"]:.2f} | {r["drop"]:.2f} |')
        out.append('')
    out += [f'- {n}' for n in doc.get('notes', [])]
    return '\n'.join(out)
