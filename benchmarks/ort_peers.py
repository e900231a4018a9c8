#!/usr/bin/env python
"""onnxruntime int8 peers of the integer DeiT-Tiny, built and measured on this machine.

    python benchmarks/ort_peers.py --data ../shared/data [--work-dir work_dirs/ort_peers]
        [--calib 256] [--threads 2]

What a deployment engineer would use instead of our integer model
(``../shared/reference/peers_int8.md`` measured these on another, loaded machine): timm's float
DeiT-Tiny exported to ONNX (opset 17, plain MatMul / Softmax attention), then quantized by
onnxruntime's own tools with the settings that reference names:

- ``onnxruntime static int8``: ``quantize_static``, QDQ, per-channel int8 weights, uint8
  per-tensor activations, MinMax over ``--calib`` calibration images (a seed-0 permutation of
  ``imagenet/calib1000``), every op onnxruntime quantizes by default;
- ``onnxruntime dynamic int8``: ``quantize_dynamic``, per-channel int8 weights, uint8 activations
  ranged per call (attention products and softmax stay float);
- ``onnxruntime fp32``: the exported float model.

This script builds the models (kept in ``--work-dir``; rebuilt when missing), evaluates their
top-1 on all ``val1300`` images and writes ``benchmarks/results/ort_peers.json``;
``integer_speed.py --peers`` times them in the same interleaved rounds as the float and integer
models.
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

PEERS = ('onnxruntime fp32', 'onnxruntime static int8', 'onnxruntime dynamic int8')
FILES = {'onnxruntime fp32': 'deit_tiny_fp32.onnx',
         'onnxruntime static int8': 'deit_tiny_static_qdq_u8s8_minmax.onnx',
         'onnxruntime dynamic int8': 'deit_tiny_dynamic_s8_per_channel.onnx'}


def _replace_when_done(build, path):
    """Run ``build(tmp)`` and move its output to ``path`` only once it is complete (``tmp``
    keeps the extension, which onnxruntime's tools read)."""
    root, ext = osp.splitext(path)
    tmp = root + '.tmp' + ext
    build(tmp)
    os.replace(tmp, path)


def export_float(data, path):
    """timm's DeiT-Tiny with the real weights as ONNX (batch dimension dynamic)."""
    from integer_speed import float_model
    model = float_model(data)
    for blk in model.blocks:          # plain MatMul / Softmax attention, as the reference did
        blk.attn.fused_attn = False

    def build(tmp):
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), tmp, opset_version=17,
                          dynamo=False, input_names=['x'], output_names=['logits'],
                          dynamic_axes={'x': {0: 'batch'}, 'logits': {0: 'batch'}})
    _replace_when_done(build, path)


class _CalibrationImages:
    """onnxruntime's calibration data reader over preprocessed images, 8 per batch."""

    def __init__(self, x):
        self.batches = [x[i:i + 8].numpy() for i in range(0, len(x), 8)]

    def get_next(self):
        return {'x': self.batches.pop(0)} if self.batches else None

    def rewind(self):
        raise NotImplementedError


def calibration_images(data, n):
    """``n`` images of calib1000 in a fixed order (numpy seed-0 permutation)."""
    import numpy as np

    from imagenet_images import load_images
    x, _ = load_images(osp.join(data, 'imagenet', 'calib1000'), None)
    order = np.random.RandomState(0).permutation(len(x))[:n]
    return x[torch.from_numpy(order)]


def build_peers(data, work_dir, calib=256):
    """The three peer models' paths (built where missing) and how each was made."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    os.makedirs(work_dir, exist_ok=True)
    paths = {k: osp.join(work_dir, v) for k, v in FILES.items()}
    recipe = dict(calib_images=calib, calib_order='numpy seed-0 permutation of calib1000',
                  static='quantize_static: QDQ, per-channel QInt8 weights, QUInt8 activations, '
                         'MinMax, default op types',
                  dynamic='quantize_dynamic: per-channel QInt8 weights, QUInt8 activations')
    stamp = osp.join(work_dir, 'recipe.json')
    if osp.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) != recipe:        # other settings: quantize again
                for name in ('onnxruntime static int8', 'onnxruntime dynamic int8'):
                    if osp.isfile(paths[name]):
                        os.remove(paths[name])
    fp32 = paths['onnxruntime fp32']
    if not osp.isfile(fp32):
        export_float(data, fp32)
    prepared = osp.join(work_dir, 'deit_tiny_fp32_prepared.onnx')
    if not osp.isfile(prepared):
        _replace_when_done(lambda tmp: quant_pre_process(fp32, tmp), prepared)
    if not osp.isfile(paths['onnxruntime static int8']):
        reader = _CalibrationImages(calibration_images(data, calib))
        t0 = time.time()
        _replace_when_done(lambda tmp: quantize_static(
            prepared, tmp, reader, quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax), paths['onnxruntime static int8'])
        print(f'quantize_static: {time.time() - t0:.0f} s on {calib} images', flush=True)
    if not osp.isfile(paths['onnxruntime dynamic int8']):
        _replace_when_done(lambda tmp: quantize_dynamic(
            prepared, tmp, per_channel=True, weight_type=QuantType.QInt8),
            paths['onnxruntime dynamic int8'])
    def write_stamp(tmp):
        with open(tmp, 'w') as f:
            json.dump(recipe, f, indent=1)
    _replace_when_done(write_stamp, stamp)
    return paths, recipe


class OrtModel:
    """An onnxruntime CPU session called like a torch model: logits for a float batch."""

    def __init__(self, path, threads, spin=True):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
        self.session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
        self.path = path

    def __call__(self, x):
        return torch.from_numpy(self.session.run(None, {'x': x.numpy()})[0])


def top1(model, data, batch=50):
    from integer_agreement import load_images
    hits = n = 0
    with torch.inference_mode():
        for x, y in load_images(data, 1300, batch):
            hits += int((model(x).argmax(-1) == y).sum())
            n += len(y)
    return 100.0 * hits / n, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=osp.join(ROOT, '..', 'shared', 'data'))
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'ort_peers'))
    p.add_argument('--calib', type=int, default=256)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args(argv)
    if not osp.isdir(osp.join(args.data, 'imagenet', 'calib1000')):
        raise SystemExit(f'--data {args.data!r}: imagenet/calib1000 not found there')
    if not 1 <= args.calib <= 1000:
        raise SystemExit(f'--calib {args.calib}: between 1 and 1000 images expected')
    import onnxruntime

    from results_md import machine_info, save_result
    torch.set_num_threads(args.threads)
    paths, recipe = build_peers(args.data, args.work_dir, args.calib)
    rows = []
    for name in PEERS:
        t0 = time.time()
        acc, n = top1(OrtModel(paths[name], args.threads), args.data)
        rows.append(dict(peer=name, top1=acc, images=n, file_bytes=osp.getsize(paths[name]),
                         eval_seconds=time.time() - t0))
        print(f'{name}: top-1 {acc:.2f} on {n} images, {rows[-1]["file_bytes"] / 1e6:.2f} MB', flush=True)
    save_result('ort_peers.json', dict(
        command='python benchmarks/ort_peers.py ' + ' '.join(sys.argv[1:]),
        machine=machine_info(), date=datetime.date.today().isoformat(),
        onnxruntime=onnxruntime.__version__, recipe=recipe, rows=rows))


if __name__ == '__main__':
    main()
