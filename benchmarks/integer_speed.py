#!/usr/bin/env python
"""Integer DeiT-Tiny vs float eager: latency at batch 1 and 32, interleaved rounds, per-op profile.

    python benchmarks/integer_speed.py [--presets repq_w4a4,fqvit_884] [--threads 2] [--rounds 7]
        [--states work_dirs/integer_states] [--compile] [--torch-ops] [--no-amx] [--unfused-blocks]
        [--peers] [--allocator tuned]

Every round runs each variant (float eager, then each integer preset; the order rotates per round)
as a block: warm-up calls, then timed calls (batch 1: 10, batch 32: 2); a variant's time in a
round is the median of its block, its ratio the block median over float's in the same round; the
table reports medians over rounds. ``--compile`` adds variants whose elementwise kernels
around each integer GEMM (input quantization, int32 bias + rescale / dyadic requantization) are
fused by ``torch.compile`` (``fqvit_det.integer.use_compiled_kernels``; compiling the whole integer
model fails in inductor on the attention's data-dependent ops), measured beside eager.
``--torch-ops`` adds each integer model with the compiled C++ kernels switched off
(``fqvit_det.integer.kernels.set_backend('torch')``: the same numbers through torch ops).
``--unfused-blocks`` adds each integer model replayed with its ViT blocks unfused (the A/B of
``fqvit_det/integer/blocks.py``'s fused passes). ``--no-amx`` adds each integer model (and its replayed run) with the int8 GEMMs through
``torch._int_mm`` instead of AMX tiles, on CPUs that have AMX (``kernels.set_amx(False)``).

``--peers`` adds onnxruntime's own int8 models of the float DeiT-Tiny (``ort_peers.py``: fp32,
static QDQ int8, dynamic int8) to the same rounds, so their ratios to float eager come from the
same machine and minutes as ours.

``--allocator tuned`` re-runs the script with glibc's malloc told to keep freed memory
(``GLIBC_TUNABLES`` trim / mmap thresholds): with the default settings every large tensor of a
forward (float and integer alike) is page-faulted in again once the other model has run, and
those faults are a large share of both models' time on this 2-core machine. Both settings are
reported; the ratio compares float and integer under the same one.

The calibrated states come from ``tools/test.py`` as for ``integer_agreement.py``. Writes
benchmarks/results/integer_speed.json (``_tuned`` for the tuned allocator) and re-renders
RESULTS.md.
"""
import argparse
import datetime
import os
import os.path as osp
import statistics
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from integer_agreement import (MODEL, add_preset_args, build_simulated,  # noqa: E402
                               chosen_presets, load_images)

# glibc malloc keeps up to 2 GiB of freed memory and serves tensors up to 32 MiB from its heap
TUNED_MALLOC = 'glibc.malloc.trim_threshold=2147483648:glibc.malloc.mmap_threshold=33554432'


def float_model(data):
    import timm

    from fqvit_det.mm.checkpoint import load_weights
    model = timm.create_model(MODEL)
    model.load_state_dict(load_weights(osp.join(data, 'deit_tiny', f'{MODEL}.safetensors')))
    return model.eval()


def unfused_blocks(model):
    """A copy of an integer model whose ``IntegerTimmBlock``s are plain ``QuantTimmBlock``s (the
    same modules and numbers, the passes of ``fqvit_det/integer/blocks.py`` unfused)."""
    import copy

    from fqvit_det.convert.timm_vit import QuantTimmBlock
    from fqvit_det.integer.blocks import IntegerTimmBlock
    model = copy.deepcopy(model)
    for mod in model.modules():
        if type(mod) is IntegerTimmBlock:
            mod.__class__ = QuantTimmBlock
    return model


def time_block(fn, x, warmup, calls):
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(fn, x, calls, top=14):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    with torch.inference_mode():
        fn(x)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(calls):
                fn(x)
    events = p.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [dict(op=e.key, ms=e.self_cpu_time_total / 1e3 / calls, pct=100.0 * e.self_cpu_time_total / total)
            for e in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_preset_args(p, 'repq_w4a4,fqvit_884')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--batches', default='1,32')
    p.add_argument('--compile', action='store_true',
                   help='also time the integer models with torch.compile-fused elementwise kernels')
    p.add_argument('--replay', action='store_true',
                   help='also time each integer model replayed from C++ (fqvit_det.integer.replay)')
    p.add_argument('--torch-ops', action='store_true',
                   help='also time the integer models with the compiled kernels off')
    p.add_argument('--no-amx', action='store_true',
                   help='also time the integer models (and replayed runs) with their int8 GEMMs '
                        'through torch._int_mm instead of AMX tiles (where the CPU has AMX)')
    p.add_argument('--unfused-blocks', action='store_true',
                   help='also time each integer model replayed with its ViT blocks unfused '
                        '(QuantTimmBlock: the residual sum, its quantizer, the integer LayerNorm '
                        'and the next Linear\'s input quantization as separate passes)')
    p.add_argument('--peers', action='store_true',
                   help='also time the onnxruntime peers of ort_peers.py (fp32, static and dynamic '
                        'int8; built in --peer-dir where missing) in the same rounds')
    p.add_argument('--peer-dir', default=osp.join(ROOT, 'work_dirs', 'ort_peers'))
    p.add_argument('--allocator', choices=('default', 'tuned'), default='default',
                   help="'tuned': glibc malloc keeps freed memory (see the docstring)")
    p.add_argument('--no-profile', action='store_true')
    p.add_argument('--tag', default='',
                   help='a name for this machine: results go to integer_speed[_tuned]_<tag>.json, '
                        'beside those of other machines')
    p.add_argument('--note', default='contended machine (load average ~15-20 on 2 cores): ratios only',
                   help='what the machine was doing (goes into RESULTS.md)')
    args = p.parse_args(argv)
    if args.tag and not all(c.isalnum() or c in '-_' for c in args.tag):
        raise SystemExit(f'--tag {args.tag!r}: letters, digits, - and _ only (it names a file)')
    if args.allocator == 'tuned' and os.environ.get('GLIBC_TUNABLES') != TUNED_MALLOC:
        # the allocator reads its settings at process start: run again with them
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, GLIBC_TUNABLES=TUNED_MALLOC))
    from fqvit_det.integer import kernels
    from fqvit_det.integer import linear as int_linear
    from fqvit_det.integer import replay, to_integer
    from results_md import machine_info, save_result
    torch.set_num_threads(args.threads)
    presets = chosen_presets(args)
    variants = {'float eager': float_model(args.data)}
    for pr in presets:
        sim, _, _ = build_simulated(pr, args.states, args.data)
        variants[f'integer {pr}'] = to_integer(sim)
        del sim
    eager_kernels = dict(int_linear.KERNELS)
    compiled_kernels = None
    if args.compile:
        int_linear.use_compiled_kernels(True)
        compiled_kernels = dict(int_linear.KERNELS)
        int_linear.KERNELS.update(eager_kernels)

    amx_default = kernels.amx_ops() is not None

    def with_kernels(model, table, backend='auto', amx=amx_default):
        def run(x):
            int_linear.KERNELS.update(table)
            kernels.set_backend(backend)
            if (kernels.amx_ops() is not None) != amx:
                kernels.set_amx(amx)
            return model(x)
        return run
    for pr in presets:
        model = variants[f'integer {pr}']
        variants[f'integer {pr}'] = with_kernels(model, eager_kernels)
        if args.replay:
            variants[f'integer {pr} (replayed)'] = with_kernels(replay(model), eager_kernels)
        if args.unfused_blocks:
            variants[f'integer {pr} (replayed, unfused blocks)'] = with_kernels(
                replay(unfused_blocks(model)), eager_kernels)
        if args.no_amx and amx_default:
            variants[f'integer {pr} (no AMX)'] = with_kernels(model, eager_kernels, amx=False)
            if args.replay:
                variants[f'integer {pr} (replayed, no AMX)'] = with_kernels(
                    replay(model), eager_kernels, amx=False)
        if compiled_kernels is not None:
            variants[f'integer {pr} (compiled kernels)'] = with_kernels(model, compiled_kernels)
        if args.torch_ops:
            variants[f'integer {pr} (torch ops)'] = with_kernels(model, eager_kernels, 'torch')
    peer_files = {}
    if args.peers:
        from ort_peers import PEERS, OrtModel, build_peers
        paths, _ = build_peers(args.data, args.peer_dir)
        for name in PEERS:
            # onnxruntime's idle pool threads spin by default; on 2 vCPUs that took the second
            # core from the torch models timed after them (replayed RepQ W4A4 at batch 1:
            # 0.38 -> 0.53x float), while onnxruntime's own times were the same either way
            variants[name] = OrtModel(paths[name], args.threads, spin=False)
            peer_files[name] = osp.basename(paths[name])
    kernel_info = kernels.info()          # before the no-AMX variants switch AMX off
    print('compiled CPU kernels:', kernel_info, flush=True)
    x32, _ = next(load_images(args.data, 32, 32))
    rows, profiles = [], []
    for bs in [int(b) for b in args.batches.split(',')]:
        x = x32[:bs].contiguous()
        warmup, calls = (3, 10) if bs == 1 else (1, 2)
        names = list(variants)
        per_round = {n: [] for n in names}
        ratios = {n: [] for n in names}
        identical = {}
        with torch.inference_mode():      # compile / first-call costs outside the rounds
            for n in names:
                for _ in range(3 if '(replayed' in n else 1):   # eager, record, replay
                    out = variants[n](x)
                if n.endswith(')'):        # a variant of an integer model: same numbers
                    identical[n] = bool(torch.equal(out, variants[n[:n.rindex(' (')]](x)))
        if identical:
            print(f'batch {bs}: variants give identical outputs: {identical}')
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            t = {n: time_block(variants[n], x, warmup, calls) for n in order}
            for n in names:
                per_round[n].append(t[n])
                ratios[n].append(t[n] / t['float eager'])
            print(f'batch {bs} round {r}: ' + ', '.join(f'{n} {1e3 * t[n]:.1f} ms' for n in names), flush=True)
        for n in names:
            rows.append(dict(variant=n, batch=bs, median_ms=1e3 * statistics.median(per_round[n]),
                             ratio=statistics.median(ratios[n]), identical_to_eager=identical.get(n)))
            print(f'batch {bs}: {n}: median {rows[-1]["median_ms"]:.1f} ms, ratio {rows[-1]["ratio"]:.3f}')
        if not args.no_profile:
            for n in names:
                if (n.endswith(')') and '(replayed' not in n) or n in peer_files:
                    continue
                profiles.append(dict(variant=n, batch=bs, ops=profile(variants[n], x, 5 if bs == 1 else 1)))
    name = 'integer_speed' + ('' if args.allocator == 'default' else '_tuned') \
        + (f'_{args.tag}' if args.tag else '') + '.json'
    save_result(name, dict(
        command='python benchmarks/integer_speed.py ' + ' '.join(sys.argv[1:]),
        machine=machine_info(), threads=args.threads, date=datetime.date.today().isoformat(),
        note=args.note, allocator=args.allocator, tag=args.tag,
        glibc_tunables=os.environ.get('GLIBC_TUNABLES'), kernels=kernel_info, peer_files=peer_files,
        rows=rows, profiles=profiles))


if __name__ == '__main__':
    main()
