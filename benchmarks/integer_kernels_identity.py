#!/usr/bin/env python
"""The compiled CPU kernels change no number: the integer DeiT-Tiny's logits with the kernels on
and off (``fqvit_det.integer.kernels.set_backend``), and replayed from C++
(``fqvit_det.integer.replay``), compared bit for bit on val1300 images.

    python benchmarks/integer_kernels_identity.py [--presets repq_w4a4,fqvit_884,ptq4vit_w6a6]
        [--states work_dirs/integer_states] [--val-images 1300]

Where every logit is identical, ``integer_agreement.py``'s rows (measured through either path)
hold for both. The calibrated states come from ``tools/test.py`` as for ``integer_agreement.py``.
Writes benchmarks/results/integer_kernels_identity.json and re-renders RESULTS.md.
"""
import argparse
import datetime
import os.path as osp
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from integer_agreement import (PRESETS, add_preset_args, build_simulated,  # noqa: E402
                               chosen_presets, load_images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_preset_args(p, 'repq_w4a4,fqvit_884,ptq4vit_w6a6')
    p.add_argument('--val-images', type=int, default=1300)
    p.add_argument('--batch', type=int, default=50)
    args = p.parse_args(argv)
    from fqvit_det.integer import kernels, replay, to_integer
    from results_md import machine_info, save_result
    presets = chosen_presets(args)
    kernels.set_backend('cpp')          # fails here, before any work, where they do not build
    rows = []
    for pr in presets:
        sim, _, _ = build_simulated(pr, args.states, args.data)
        model = to_integer(sim)
        del sim
        replayed = replay(model)
        n = same = same_replayed = 0
        max_diff = 0.0
        t = {'cpp': 0.0, 'torch': 0.0, 'replay': 0.0}
        with torch.inference_mode():
            for x, _ in load_images(args.data, args.val_images, args.batch):
                out = {}
                for backend in ('cpp', 'torch'):
                    kernels.set_backend(backend)
                    t0 = time.perf_counter()
                    out[backend] = model(x)
                    t[backend] += time.perf_counter() - t0
                kernels.set_backend('cpp')
                while replayed.stats['recorded'] == 0 and not replayed.stats['declined']:
                    replayed(x)                      # a new shape: eager, then recorded
                t0 = time.perf_counter()
                out['replay'] = replayed(x)
                t['replay'] += time.perf_counter() - t0
                d = (out['cpp'] - out['torch']).abs().amax(dim=1)
                same += int((d == 0).sum())
                same_replayed += int((out['replay'] == out['cpp']).all(dim=1).sum())
                max_diff = max(max_diff, float(d.max()))
                n += x.shape[0]
        kernels.set_backend('cpp')
        st = replayed.stats
        rows.append(dict(preset=pr, config=PRESETS[pr], images=n, identical_images=same,
                         max_logit_diff=max_diff, seconds_compiled=t['cpp'],
                         seconds_torch_ops=t['torch'], identical_images_replayed=same_replayed,
                         replayed_batches=st['replays'], replay_fallbacks=st['fallbacks'],
                         replay_declined=st['declined'], seconds_replayed=t['replay']))
        print(f'{pr}: {same}/{n} images with identical logits, max |diff| {max_diff}; '
              f'replayed: {same_replayed}/{n} identical to eager ({st["replays"]} batches '
              f'replayed, {st["fallbacks"]} fallbacks, declined: {st["declined"] or "none"}); '
              f'{t["cpp"]:.1f} s compiled vs {t["torch"]:.1f} s torch ops vs '
              f'{t["replay"]:.1f} s replayed', flush=True)
    save_result('integer_kernels_identity.json', dict(
        command='python benchmarks/integer_kernels_identity.py ' + ' '.join(sys.argv[1:]),
        machine=machine_info(), date=datetime.date.today().isoformat(), kernels=kernels.info(),
        rows=rows))


if __name__ == '__main__':
    main()
