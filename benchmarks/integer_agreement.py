#!/usr/bin/env python
"""Integer vs simulated DeiT-Tiny: top-1 agreement on val1300, logit differences, where they start.

    python benchmarks/integer_agreement.py [--presets fqvit_884,ptq4vit_w6a6,repq_w4a4]
        [--states work_dirs/integer_states] [--val-images 1300] [--requant float|dyadic]

The integer model is compared with two simulations of the same calibrated state: the
integer-exact one (``fqvit_det.nn.exact.set_exact_arithmetic``: GEMMs on codes, what the integer
kernels compute) and the default float32 one (GEMMs on dequantized values).

Each preset is a real config of configs/cls/; its calibrated state is read from
``<states>/<config name>/quant_state.safetensors``, which ``tools/test.py <config> --work-dir
<states>/<config name>`` writes (run it once per preset; the script prints the command when the
file is missing). Writes benchmarks/results/integer_agreement.json and re-renders RESULTS.md.
"""
import argparse
import datetime
import os
import os.path as osp
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

PRESETS = {  # name: config file
    'fqvit_884': 'configs/cls/deit_tiny_w8a8a4.py',
    'ptq4vit_w6a6': 'configs/cls/deit_tiny_ptq4vit_w6a6.py',
    'ptq4vit_w8a8': 'configs/cls/deit_tiny_ptq4vit_w8a8.py',
    'repq_w4a4': 'configs/cls/deit_tiny_repq_w4a4.py',
    'adalog_w4a4': 'configs/cls/deit_tiny_adalog_w4a4.py',
    'fqvit_888': 'configs/cls/deit_tiny_w8a8.py',
}
MODEL = 'deit_tiny_patch16_224'


def add_preset_args(p: argparse.ArgumentParser, presets: str) -> None:
    """--data, --presets (default ``presets``) and --states, as the integer benchmarks share them."""
    p.add_argument('--data', default=osp.join(ROOT, '..', 'shared', 'data'))
    p.add_argument('--presets', default=presets, help=f'comma list of {sorted(PRESETS)}')
    p.add_argument('--states', default=osp.join('work_dirs', 'integer_states'),
                   help='calibrated states, one tools/test.py work dir per preset')


def chosen_presets(args) -> list:
    """``args.presets`` as a list; exits naming the unknown ones before any work."""
    presets = args.presets.split(',')
    unknown = [r for r in presets if r not in PRESETS]
    if unknown:
        raise SystemExit(f'unknown presets {unknown}; choose from {sorted(PRESETS)}')
    return presets


def state_path(states_dir, preset):
    name = osp.splitext(osp.basename(PRESETS[preset]))[0]
    return osp.join(states_dir, name, 'quant_state.safetensors')


def build_simulated(preset, states_dir, data):
    """(calibrated simulated DeiT-Tiny from its state file, spec, arch)."""
    import timm

    from fqvit_det.convert import quantize_model
    from fqvit_det.mm.checkpoint import load_weights
    from fqvit_det.presets import QuantSpec
    from fqvit_det.state import load_quant_state, read_metadata
    import json
    path = state_path(states_dir, preset)
    if not osp.isfile(path):
        raise SystemExit(f'missing calibrated state {path}; write it with:\n  python tools/test.py '
                         f'{PRESETS[preset]} --work-dir {osp.dirname(path)}')
    spec = QuantSpec.from_dict(json.loads(read_metadata(path)['recipe']))
    model = timm.create_model(MODEL)
    model.load_state_dict(load_weights(osp.join(data, 'deit_tiny', f'{MODEL}.safetensors')))
    model.eval()
    quantize_model(model, spec)
    load_quant_state(model, path, spec)
    return model, spec, dict(model_name=MODEL)


def load_images(data, n, batch):
    """The first ``n`` val1300 images in batches of ``batch`` (configs' pipeline)."""
    from imagenet_images import load_images as load_all
    x, y = load_all(osp.join(data, 'imagenet', 'val1300'), n)
    for i in range(0, len(x), batch):
        yield x[i:i + batch], y[i:i + batch]


def block_divergence(sim, integer, x):
    """Per block: max |residual stream difference| and the fraction of differing elements, plus
    the integer GEMM layers whose output first differs (first batch)."""
    outs = {}

    def hook(tag):
        def fn(mod, inp, out):
            outs.setdefault(tag, []).append(out.detach())
        return fn
    handles = []
    for tag, model in (('sim', sim), ('int', integer)):
        for i, blk in enumerate(model.blocks):
            handles.append(blk.register_forward_hook(hook(f'{tag}.{i}')))
    with torch.no_grad():
        sim(x)
        integer(x)
    for h in handles:
        h.remove()
    rows = []
    for i in range(len(sim.blocks)):
        a, b = outs[f'sim.{i}'][0], outs[f'int.{i}'][0]
        d = (a - b).abs()
        rows.append(dict(block=i, max_abs=float(d.max()), frac_differ=float((d > 0).float().mean()),
                         rel=float(d.max() / a.abs().max())))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_preset_args(p, 'fqvit_884,ptq4vit_w6a6,repq_w4a4')
    p.add_argument('--val-images', type=int, default=1300)
    p.add_argument('--batch', type=int, default=50)
    p.add_argument('--size-only', action='store_true',
                   help='re-export with the current code and update only the size / reload columns of '
                        'the existing rows (first batch of images for the reload check)')
    p.add_argument('--requant', default='float', choices=['float', 'dyadic'],
                   help="to_integer's requantization (float: the simulation's rounding; dyadic: M·2^-N)")
    p.add_argument('--json', default='integer_agreement.json',
                   help='result file under benchmarks/results (RESULTS.md renders integer_agreement.json)')
    p.add_argument('--export-dir', default=osp.join('work_dirs', 'integer_export'),
                   help='where the integer exports (safetensors) are written for the size column')
    args = p.parse_args(argv)
    import copy

    from fqvit_det.integer import load_integer, to_integer
    from fqvit_det.nn.exact import set_exact_arithmetic
    from results_md import load_result, machine_info, save_result
    presets = chosen_presets(args)
    for pr in presets:     # fail before any heavy work
        if not osp.isfile(state_path(args.states, pr)):
            build_simulated(pr, args.states, args.data)
    float_bytes = os.path.getsize(osp.join(args.data, 'deit_tiny', f'{MODEL}.safetensors'))
    if args.size_only:
        return update_sizes(args, presets, float_bytes)
    for pr in presets:
        t0 = time.time()
        sim, spec, arch = build_simulated(pr, args.states, args.data)
        integer = to_integer(sim, requant=args.requant)
        exact = copy.deepcopy(sim)
        set_exact_arithmetic(exact)
        export = osp.join(args.export_dir, f'{pr}.safetensors')
        size, plain_size = export_sizes(integer, export, arch, spec)
        reloaded = load_integer(export)
        n = same = same_f32 = sim_correct = f32_correct = int_correct = 0
        max_diff, max_diff_f32, worst, identical_reload = 0.0, 0.0, None, True
        divergence = None
        with torch.no_grad():
            for x, y in load_images(args.data, args.val_images, args.batch):
                if divergence is None:
                    divergence = block_divergence(exact, integer, x[:16])
                a, b, f = exact(x), integer(x), sim(x)
                if n == 0:
                    identical_reload = bool(torch.equal(b, reloaded(x)))
                d = (a - b).abs().amax(dim=1)
                if float(d.max()) > max_diff:
                    max_diff, worst = float(d.max()), n + int(d.argmax())
                max_diff_f32 = max(max_diff_f32, float((f - b).abs().max()))
                same += int((a.argmax(1) == b.argmax(1)).sum())
                same_f32 += int((f.argmax(1) == b.argmax(1)).sum())
                sim_correct += int((a.argmax(1) == y).sum())
                f32_correct += int((f.argmax(1) == y).sum())
                int_correct += int((b.argmax(1) == y).sum())
                n += len(y)
        rec = dict(preset=pr, config=PRESETS[pr], bits=f'{spec.w_bits}/{spec.a_bits}/{spec.attn_bits}',
                   images=n, requant=args.requant, agree_pct=100.0 * same / n, disagree=n - same,
                   agree_f32_pct=100.0 * same_f32 / n, disagree_f32=n - same_f32,
                   sim_top1=100.0 * sim_correct / n, sim_f32_top1=100.0 * f32_correct / n,
                   int_top1=100.0 * int_correct / n,
                   max_logit_diff=max_diff, max_logit_diff_f32=max_diff_f32, worst_image=worst, block_divergence=divergence,
                   integer_gemms=len(integer.fqvit_integer_plan), export_bytes=size,
                   float_bytes=float_bytes, size_ratio=float_bytes / size,
                   export_bytes_plain=plain_size, size_ratio_plain=float_bytes / plain_size,
                   reload_bit_identical=identical_reload, seconds=time.time() - t0,
                   date=datetime.date.today().isoformat(), command=command())
        # re-read just before writing: runs for other presets may have saved in the meantime
        old = load_result(args.json) or {}
        records = {r['preset']: r for r in old.get('records', []) if old.get('val_images') == args.val_images}
        records[pr] = rec
        print(f'{pr}: agree with the exact simulation {rec["agree_pct"]:.2f}% ({n - same} of {n} '
              f'differ), with the float32 simulation {rec["agree_f32_pct"]:.2f}%; top-1 exact sim '
              f'{rec["sim_top1"]:.2f}, f32 sim {rec["sim_f32_top1"]:.2f}, int {rec["int_top1"]:.2f}, '
              f'max |logit diff| {max_diff:.4f} (f32 sim {max_diff_f32:.4f}), '
              f'export {size / 1e6:.2f} MB ({rec["size_ratio"]:.2f}x smaller), reload identical '
              f'{identical_reload}', flush=True)
        save_result(args.json, dict(
            machine=machine_info(), val_images=args.val_images, records=list(records.values()),
            date=datetime.date.today().isoformat()))


def update_sizes(args, presets, float_bytes):
    """``--size-only``: re-export each preset and rewrite its row's size and reload columns."""
    from fqvit_det.integer import load_integer, to_integer
    from results_md import load_result, save_result
    x, _ = next(load_images(args.data, args.batch, args.batch))
    for pr in presets:
        sim, spec, arch = build_simulated(pr, args.states, args.data)
        integer = to_integer(sim, requant=args.requant)
        export = osp.join(args.export_dir, f'{pr}.safetensors')
        size, plain_size = export_sizes(integer, export, arch, spec)
        with torch.no_grad():
            identical = bool(torch.equal(integer(x), load_integer(export)(x)))
        old = load_result(args.json)
        for r in old['records']:
            if r['preset'] == pr:
                r.update(export_bytes=size, size_ratio=float_bytes / size, reload_bit_identical=identical,
                         export_bytes_plain=plain_size, size_ratio_plain=float_bytes / plain_size,
                         size_command=command(), size_date=datetime.date.today().isoformat())
        save_result(args.json, old)
        print(f'{pr}: export {size / 1e6:.3f} MB ({float_bytes / size:.2f}x smaller; not entropy-coded '
              f'{plain_size / 1e6:.3f} MB, {float_bytes / plain_size:.2f}x), reload identical {identical}',
              flush=True)


def export_sizes(integer, export, arch, spec):
    """(bytes of ``export`` as ``save_integer`` writes it, bytes without entropy coding; that
    second file is written beside it with the suffix ``.plain.safetensors``)."""
    from fqvit_det.integer import save_integer
    plain = export[:-len('.safetensors')] + '.plain.safetensors'
    return (save_integer(integer, export, arch, spec),
            save_integer(integer, plain, arch, spec, entropy_coding=False))


def command():
    return 'python benchmarks/integer_agreement.py ' + ' '.join(sys.argv[1:])


if __name__ == '__main__':
    main()
