#!/usr/bin/env python
"""Export a calibrated (simulated) classifier from an mmengine config to ONNX.

    python tools/export_onnx.py configs/cls/deit_tiny_w8a8.py --quant-state work_dirs/deit_tiny_w8a8/quant_state.safetensors --out deit_tiny_w8a8.onnx
    python tools/export_onnx.py configs/cls/deit_tiny_w8a8a4.py --out deit_tiny_w8a8a4.onnx --save-state state.safetensors

Without ``--quant-state`` the model is calibrated first (the config's calibration data and number
of images, as ``tools/test.py`` does). Uniform quantizers become QuantizeLinear/DequantizeLinear,
weights int8 initializers + DequantizeLinear, the non-uniform quantizers standard ONNX ops
(``fqvit_det/export/onnx.py``); with ``--arithmetic exact`` the quantized Linears are
MatMulInteger on the codes with an exact rescale, the model's integer-exact simulation. The graph's input is the preprocessed image batch (the dataset
transform's output, normalized), its output the logits; the batch dimension is dynamic.
"""
import argparse
import contextlib
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Export a calibrated classifier to ONNX')
    p.add_argument('config', help='config file path (a classification config with quant_cfg)')
    p.add_argument('--out', required=True, help='output .onnx file')
    p.add_argument('--quant-state', help='calibrated state to export (no calibration)')
    p.add_argument('--save-state', help='when calibrating here: also save the calibrated state')
    p.add_argument('--checkpoint', help='float weights (.safetensors or .pth, loaded weights-only)')
    p.add_argument('--calib-images', type=int, help='override the number of calibration images')
    p.add_argument('--float', action='store_true', help='export the float model (quantizers off)')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset (>= 13; default 17)')
    p.add_argument('--arithmetic', choices=('float', 'exact'), default='float',
                   help="'float' (default): the float32 simulation, QDQ around float MatMuls that "
                        "onnxruntime fuses into its integer kernels; 'exact': the integer-exact "
                        'simulation (tools/test.py --exact-arithmetic, the integer model\'s '
                        'arithmetic): MatMulInteger on the codes and an exact rescale; a quantized '
                        'layer on a float input (PTQ4ViT\'s patch embedding) as a float64 MatMul')
    p.add_argument('--input-size', type=int, nargs=2, metavar=('H', 'W'),
                   help="input height and width (default: the model's own image size)")
    p.add_argument('--verify', action='store_true',
                   help='run the exported file in onnxruntime on a random batch and print the max '
                        '|difference| to the simulated model (graph optimizations off and on)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                   help='override config keys')
    return p.parse_args(argv)


from mmengine.config import Config, DictAction  # noqa: E402


def fail(msg: str):
    raise SystemExit(f'export_onnx: {msg}')


def check_args(args):
    """Every path and value checked before any model is built."""
    if not osp.isfile(args.config):
        fail(f'config {args.config!r} not found')
    if args.quant_state and not osp.isfile(args.quant_state):
        fail(f'--quant-state {args.quant_state!r} not found (a quant_state.safetensors written by '
             'tools/test.py --work-dir, or by --save-state here)')
    if args.quant_state and (args.save_state or args.calib_images):
        fail('--save-state / --calib-images apply when calibrating; they cannot be combined with '
             '--quant-state')
    if args.float and (args.quant_state or args.save_state):
        fail('--float exports the float model; remove --quant-state / --save-state')
    if args.checkpoint and not osp.isfile(args.checkpoint):
        fail(f'--checkpoint {args.checkpoint!r} not found')
    if args.opset < 13:
        fail(f'--opset must be >= 13 (per-axis QuantizeLinear), got {args.opset}')
    if args.calib_images is not None and args.calib_images < 1:
        fail(f'--calib-images must be >= 1, got {args.calib_images}')
    if args.input_size and min(args.input_size) < 1:
        fail(f'--input-size must be positive, got {args.input_size}')
    for what, path in (('--out', args.out), ('--save-state', args.save_state)):
        if path:
            parent = osp.dirname(osp.abspath(path))
            if not osp.isdir(parent):
                fail(f'{what} {path!r}: directory {parent!r} does not exist')
    if not args.out.endswith('.onnx'):
        fail(f'--out {args.out!r} must end with .onnx')


def calibration_loader_cfg(cfg, model):
    """The calibration dataloader tools/test.py would use: the CalibrationHook's, the quant_cfg's,
    else the test dataloader."""
    for h in cfg.get('custom_hooks', []):
        if h.get('type') == 'CalibrationHook' and h.get('dataloader'):
            return h['dataloader']
    return model.quant_glue.get('calib_dataloader') or cfg.get('test_dataloader')


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    import torch

    from fqvit_det.calibration import CalibrationRunner, set_quant_mode
    from fqvit_det.export import export_onnx
    from fqvit_det.export.onnx import check_exportable
    from fqvit_det.mm.hooks import build_calibration_loader
    from fqvit_det.mm.launch import CLASSIFIERS, check_dataset, prepare_config
    from fqvit_det.state import load_quant_state, save_quant_state

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg = prepare_config(cfg, checkpoint=args.checkpoint, quant_state=args.quant_state,
                         check_data=False)   # wraps a plain mmpretrain config in QuantizedClassifier
    if cfg.model.get('type') not in CLASSIFIERS:
        fail(f'model.type {cfg.model.get("type")!r}: ONNX export supports classification configs '
             f'(mmpretrain models, wrapped in {list(CLASSIFIERS)})')
    if not args.float and cfg.model.get('quant_cfg') is None:
        fail(f'{args.config} has no quant_cfg: nothing to quantize (use --float for a float export)')
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import set_random_seed
    import fqvit_det.mm  # noqa: F401  (registers the models)
    # the config's registry scope (its datasets and transforms), as mmengine's Runner sets it
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    seed = (cfg.get('randomness') or {}).get('seed')
    if seed is not None:   # as mmengine's Runner: layers without trained weights are reproducible
        set_random_seed(seed)
    model = MODELS.build(cfg.model)
    target = model.quant_target
    spec = model.quant_spec
    if args.float:
        if spec is not None:
            set_quant_mode(target, 'float')
    elif args.quant_state:
        load_quant_state(target, args.quant_state, spec, origin='--quant-state')
    else:
        dl_cfg = calibration_loader_cfg(cfg, model)
        check_dataset(dl_cfg.get('dataset'), 'calibration dataloader dataset')
        num = args.calib_images or spec.calib_images
        loader = build_calibration_loader(dl_cfg, num, 0, 1)
        CalibrationRunner(target, spec, forward_fn=model.calib_forward, progress=True).run(
            loader, rank_images=loader.batch_sampler.num_images)
        if args.save_state:
            save_quant_state(target, args.save_state, spec)
            print(f'saved calibrated state to {args.save_state}')
    check_exportable(target)
    if args.input_size:
        h, w = args.input_size
    else:
        size = getattr(getattr(target, 'patch_embed', None), 'img_size', None)
        if size is None:
            fail('cannot tell the input size of this model; pass --input-size H W')
        h, w = size
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    report = export_onnx(target, example, args.out, opset=args.opset, arithmetic=args.arithmetic)
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB, opset {args.opset})')
    for form, count in report.summary().items():
        print(f'  {count:4d} × {form}')
    print('  ops: ' + ', '.join(f'{k} {v}' for k, v in report.op_counts.items()
                                 if k in ('QuantizeLinear', 'DequantizeLinear', 'MatMul',
                                          'MatMulInteger', 'Conv',
                                          'LayerNormalization', 'Log', 'Gather')))
    if args.verify:
        verify(target, args.out, h, w, args.arithmetic)
    return report


def verify(model, path, h, w, arithmetic='float'):
    import numpy as np
    import onnxruntime as ort
    import torch

    from fqvit_det.export.onnx import EXACT_FLOAT_INPUT_GEMM
    from fqvit_det.nn.exact import exact_arithmetic
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    exact = (exact_arithmetic(model, float_input_gemm=EXACT_FLOAT_INPUT_GEMM)
             if arithmetic == 'exact' else contextlib.nullcontext())
    with torch.no_grad(), exact:
        ref = model(x).numpy()
    for level, name in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 'off'),
                        (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 'all')):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        print(f'verify (graph optimizations {name}): max |onnxruntime − simulated ({arithmetic})| = '
              f'{float(np.abs(out - ref).max()):.3g}, same top-1: '
              f'{bool((out.argmax(-1) == ref.argmax(-1)).all())}')


if __name__ == '__main__':
    main()
