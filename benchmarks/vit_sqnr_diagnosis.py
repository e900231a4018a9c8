#!/usr/bin/env python
"""Where the DeiT-Tiny backbone loses feature SQNR: per-block residual-stream SQNR on COCO images.

    python benchmarks/vit_sqnr_diagnosis.py [--data ../shared/data] [--size 224] [--calib 8] [--test 4]

Runs the real DeiT-Tiny (timm, ``dynamic_img_size``) on coco_mini images normalized as mmdet does,
calibrates on the first ``--calib`` train2017 images and reports, on the first ``--test`` val2017
images, the SQNR (float vs quantized) of every block output and of the final features for:
the converted model with every quantizer off (checks the conversion is exact), FQ-ViT 8/8/8
(MinMax + PTF + LIS), FQ-ViT 8/8/8 with every activation at 16 bits, and the same with 16-bit
weights. Appends a section to benchmarks/results/det_benchmark.json (rendered into RESULTS.md).
"""
import argparse
import glob
import math
import os.path as osp
import sys

import numpy as np
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from fqvit_det.calibration import CalibrationRunner, set_quant_mode  # noqa: E402
from fqvit_det.convert import quantize_model  # noqa: E402
from fqvit_det.mm.checkpoint import load_weights  # noqa: E402
from fqvit_det.presets import make_spec  # noqa: E402
from results_md import load_result, save_result  # noqa: E402

ACT_ROLES = ('patch_embed_input', 'ln_input', 'ln_output', 'q', 'k', 'v', 'attn_logits', 'attn_probs',
             'proj_input', 'fc2_input', 'head_input')


def _u16():
    return dict(type='UniformQuantizer', bits=16, observer=dict(type='MinMaxObserver'))


VARIANTS = {
    'fqvit 8/8/8 (PTF + LIS)': dict(method='fqvit', attn_bits=8),
    'fqvit 8/8/4 (PTF + LIS)': dict(method='fqvit', attn_bits=4),
    'activations 16-bit, weights 8-bit': dict(method='fqvit', ptf=False, lis=False,
                                              roles={r: _u16() for r in ACT_ROLES}),
    'activations and weights 16-bit': dict(method='fqvit', ptf=False, lis=False, roles=dict(
        {r: _u16() for r in ACT_ROLES}, weight=dict(_u16(), symmetric=True, ch_axis=0),
        patch_embed_weight=dict(_u16(), symmetric=True, ch_axis=0))),
}


def load(files, size):
    from PIL import Image
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    out = []
    for f in files:
        img = np.array(Image.open(f).convert('RGB').resize((size, size)))
        out.append((torch.from_numpy(img).permute(2, 0, 1).float() - mean) / std)
    return torch.stack(out)


def deit(ckpt):
    import timm
    m = timm.create_model('deit_tiny_patch16_224', num_classes=0, global_pool='',
                          dynamic_img_size=True, dynamic_img_pad=True)
    m.load_state_dict({k: v for k, v in load_weights(ckpt).items() if not k.startswith('head.')})
    return m.eval()


def db(ref, out):
    noise = (ref - out).double().pow(2).sum().item()
    return float('inf') if noise == 0 else 10 * math.log10(ref.double().pow(2).sum().item() / noise)


def block_outputs(model, x):
    acts = {}
    hooks = [b.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, o))
             for n, b in enumerate(model.blocks)]
    with torch.no_grad():
        final = model.forward_features(x)
    for h in hooks:
        h.remove()
    return [acts[n] for n in range(len(model.blocks))], final


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=osp.join(ROOT, '..', 'shared', 'data'))
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--calib', type=int, default=8)
    p.add_argument('--test', type=int, default=4)
    args = p.parse_args(argv)
    ckpt = osp.join(args.data, 'deit_tiny', 'deit_tiny_patch16_224.safetensors')
    coco = osp.join(args.data, 'coco_mini')
    if not osp.isfile(ckpt) or not osp.isdir(coco):
        raise SystemExit(f'need {ckpt} and {coco}: pass --data pointing at the shared data folder')
    calib = load(sorted(glob.glob(osp.join(coco, 'train2017', '*.jpg')))[:args.calib], args.size)
    test = load(sorted(glob.glob(osp.join(coco, 'val2017', '*.jpg')))[:args.test], args.size)
    ref_blocks, ref_final = block_outputs(deit(ckpt), test)
    rows = []
    for name, cfg in VARIANTS.items():
        model = deit(ckpt)
        spec = make_spec(**cfg)
        quantize_model(model, spec)
        CalibrationRunner(model, spec, forward_fn=lambda m, b: m.forward_features(b),
                          progress=False).run([calib])
        if not rows:
            set_quant_mode(model, 'float')
            _, f = block_outputs(model, test)
            rows.append(dict(variant='converted, every quantizer off', final_db=db(ref_final, f),
                             blocks_db=[]))
            set_quant_mode(model, 'quant')
        blocks, final = block_outputs(model, test)
        rows.append(dict(variant=name, final_db=db(ref_final, final),
                         blocks_db=[db(r, b) for r, b in zip(ref_blocks, blocks)]))
        print(f'{name}: final {rows[-1]["final_db"]:.1f} dB; blocks '
              + ' '.join(f'{v:.1f}' for v in rows[-1]['blocks_db']), flush=True)
    doc = load_result('det_benchmark.json') or {}
    doc['sqnr_diagnosis'] = dict(
        command='python benchmarks/vit_sqnr_diagnosis.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
        size=args.size, calib_images=args.calib, test_images=args.test, rows=rows)
    save_result('det_benchmark.json', doc)


if __name__ == '__main__':
    main()
