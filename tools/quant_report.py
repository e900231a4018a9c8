#!/usr/bin/env python
"""Per-layer quantization error (SQNR, cosine) of a quantized model from an mmengine config.

    python tools/quant_report.py configs/cls/deit_tiny_w8a8a4.py --num-images 8
    python tools/quant_report.py CONFIG --quant-state work_dirs/x/quant_state.safetensors

The model is built and calibrated exactly as ``tools/test.py`` does (the config's
``CalibrationHook``: its dataloader, image count and method), or loaded from ``--quant-state``;
then ``--num-images`` test images run through it in float and in quantized mode and every
quantized module's output is compared. Writes ``layer_report.{md,csv,png}`` into ``--out-dir``
(default ``<work_dir>/report``), plus the calibrated state when it calibrated.
"""
import argparse
import copy
import os
import os.path as osp
import sys
import types

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Per-layer SQNR / cosine report of a quantized model')
    p.add_argument('config', help='config file path')
    p.add_argument('--checkpoint', help='float weights (.safetensors or .pth, loaded weights-only)')
    p.add_argument('--quant-state', help='use a saved calibrated state instead of calibrating')
    p.add_argument('--num-images', type=int, default=8, help='test images to compare on (default 8)')
    p.add_argument('--out-dir', help='output directory (default <work_dir>/report)')
    p.add_argument('--store-cpu', action='store_true',
                   help='hold the float outputs of a batch on the CPU (large detection inputs)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                   help='override config keys, e.g. custom_hooks.0.num_images=32')
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error('--num-images must be >= 1')
    return args


def _require_file(path, what):
    if path and not osp.isfile(path):
        raise FileNotFoundError(f'{what} {path!r} does not exist')


def build_model(cfg):
    """The config's model (a quantizable wrapper), on the accelerator when there is one."""
    import torch
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model = MODELS.build(cfg.model)
    if getattr(model, 'quant_spec', None) is None:
        raise ValueError('the config has no quant_cfg: there is nothing quantized to report on')
    model.to('cuda' if torch.cuda.is_available() else 'cpu')
    model.eval()
    return model


def calibrate(cfg, model, out_dir, logger):
    """Run the config's ``CalibrationHook`` (calibration, or loading its ``quant_state``)."""
    from mmengine.registry import HOOKS
    hook_cfgs = [h for h in cfg.get('custom_hooks', []) if h.get('type') == 'CalibrationHook']
    if not hook_cfgs:
        raise ValueError('the prepared config has no CalibrationHook')
    hook_cfg = copy.deepcopy(hook_cfgs[0])
    hook_cfg['float_eval'] = False
    hook = HOOKS.build(hook_cfg)
    # The hook only needs these runner attributes.
    runner = types.SimpleNamespace(model=model, logger=logger, cfg=cfg, rank=0, world_size=1,
                                   work_dir=out_dir)
    hook._calibrate(runner)
    return hook


def report_batches(cfg, num_images):
    """``num_images`` images from the test dataloader (batch size capped at ``num_images``)."""
    from mmengine.runner import Runner
    from fqvit_det.mm.hooks import take_images
    dl_cfg = copy.deepcopy(cfg.test_dataloader)
    dl_cfg['batch_size'] = max(1, min(int(dl_cfg.get('batch_size', 1)), num_images))
    loader = Runner.build_dataloader(dl_cfg, seed=0)
    return take_images(loader, num_images)


def main(argv=None):
    args = parse_args(argv)
    _require_file(args.config, 'config')
    _require_file(args.checkpoint, '--checkpoint')
    _require_file(args.quant_state, '--quant-state')

    from mmengine.logging import MMLogger
    import fqvit_det  # noqa: F401  (registers the mm components)
    from fqvit_det.mm.launch import prepare_config
    from fqvit_det.mm.hooks import STATE_NAME
    from fqvit_det.report import layer_report, worst_layers, write_report, _fmt

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = 'none'
    cfg.work_dir = cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    # Validates quant_cfg, checkpoint, quant state and dataset paths before any heavy work.
    cfg = prepare_config(cfg, checkpoint=args.checkpoint, quant_state=args.quant_state)
    out_dir = args.out_dir or osp.join(cfg.work_dir, 'report')
    os.makedirs(out_dir, exist_ok=True)
    logger = MMLogger.get_instance('fqvit_quant_report', log_level=cfg.get('log_level', 'INFO'))

    model = build_model(cfg)
    spec = model.quant_spec
    hook = calibrate(cfg, model, out_dir, logger)
    if not args.quant_state:
        logger.info(f'calibrated state: {osp.join(out_dir, STATE_NAME)} '
                    f'(reuse with --quant-state)')

    logger.info(f'layer report on {args.num_images} test images')
    rows = layer_report(model.quant_target, report_batches(cfg, args.num_images),
                        forward_fn=model.calib_forward,
                        store_device='cpu' if args.store_cpu else None)
    source = f'state {osp.basename(args.quant_state)}' if args.quant_state else (
        f'calibrated on {hook.num_images or spec.calib_images} images')
    title = (f'{osp.splitext(osp.basename(args.config))[0]}: {spec.method} '
             f'W{spec.w_bits}A{spec.a_bits} attn{spec.attn_bits} ({source}; '
             f'{args.num_images} test images)')
    paths = write_report(rows, out_dir, title)
    print(f'\n==== layer report: {len(rows)} quantized module outputs ====')
    print(f'report: {paths["md"]}\n        {paths["csv"]}\n        {paths["png"]}')
    print('worst layers (SQNR dB, cosine):')
    for r in worst_layers(rows, 5):
        print(f'  {r["index"]:>4}  {r["name"]:<40} {r["type"]:<20} '
              f'{_fmt(r["sqnr_db"], 2):>8}  {_fmt(r["cosine"], 5)}')
    skipped = sum(r['skipped'] for r in rows)
    if skipped:
        print(f'note: {skipped} module calls differed in shape or count between the float and '
              'quantized passes and were not compared')
    return dict(rows=rows, paths=paths)


if __name__ == '__main__':
    main()
