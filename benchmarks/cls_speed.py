#!/usr/bin/env python
"""Speed of calibration and simulated quantized inference vs the float forward (DeiT-Tiny, CPU).

    python benchmarks/cls_speed.py [--data ../shared/data] [--images 200]

Pre-loaded images (no data loading in the timings), batches of 100, the machine's torch threads.
For each method: observer calibration (no search) over the images and the quantized forward over
the same images, each divided by the float forward; once with the chunked fake-quant kernels
single-threaded (``CHUNK_THREADS = 1``, the setting for a machine shared with other jobs) and once
with the caller's thread count (``None``). Writes benchmarks/results/cls_speed.json and RESULTS.md.
"""
import argparse
import datetime
import os.path as osp
import sys
import time

import torch

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(HERE))
sys.path.insert(0, HERE)

import fqvit_det.quantizers.base as qbase  # noqa: E402
from fqvit_det.calibration import CalibrationRunner  # noqa: E402
from fqvit_det.convert import quantize_model  # noqa: E402
from fqvit_det.presets import make_spec  # noqa: E402
from imagenet_images import load_images  # noqa: E402
from results_md import machine_info, save_result  # noqa: E402

METHODS = {
    'fqvit_ptf_lis_884': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4),
    'fqvit_ptf_888': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=8, lis=False),
    'repq_w4a4': dict(method='repq', w_bits=4, a_bits=4),
    'ptq4vit_w8a8 (no search)': dict(method='ptq4vit', w_bits=8, a_bits=8, search=None),
    'adalog_w4a4 (no search)': dict(method='adalog', w_bits=4, a_bits=4, search=None),
}


def fresh_model(ckpt):
    import timm
    from fqvit_det.mm.checkpoint import load_weights
    model = timm.create_model('deit_tiny_patch16_224')
    model.load_state_dict(load_weights(ckpt))
    return model.eval()


def timed(fn):
    t0 = time.time()
    with torch.no_grad():
        fn()
    return time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=osp.join(HERE, '..', '..', 'shared', 'data'))
    p.add_argument('--images', type=int, default=200)
    args = p.parse_args(argv)
    ckpt = osp.join(args.data, 'deit_tiny', 'deit_tiny_patch16_224.safetensors')
    if not osp.isfile(ckpt):
        raise SystemExit(f'missing {ckpt}: pass --data pointing at the shared data folder')
    x, _ = load_images(osp.join(args.data, 'imagenet', 'calib1000'), args.images)
    batches = [x[i:i + 100] for i in range(0, len(x), 100)]
    fp = fresh_model(ckpt)
    fp(batches[0][:8])
    fp_s = min(timed(lambda: [fp(b) for b in batches]) for _ in range(2))
    rows = []
    for threads in (1, None):
        qbase.CHUNK_THREADS = threads
        for name, cfg in METHODS.items():
            model = fresh_model(ckpt)
            spec = make_spec(**cfg)
            quantize_model(model, spec)
            calib_s = timed(lambda: CalibrationRunner(model, spec, progress=False).run(batches))
            quant_s = min(timed(lambda: [model(b) for b in batches]) for _ in range(2))
            rows.append(dict(method=name, chunk_threads=threads, calib_ratio=calib_s / fp_s,
                             quant_ratio=quant_s / fp_s, calib_seconds=calib_s, quant_seconds=quant_s))
            print(f'{name} CHUNK_THREADS={threads}: calibration {calib_s / fp_s:.2f}x, '
                  f'quantized forward {quant_s / fp_s:.2f}x float ({fp_s:.1f}s)', flush=True)
    doc = dict(command='python benchmarks/cls_speed.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
               machine=machine_info(), date=datetime.date.today().isoformat(), images=len(x),
               float_seconds=fp_s, rows=rows)
    save_result('cls_speed.json', doc)


if __name__ == '__main__':
    main()
