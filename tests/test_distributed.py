"""Two gloo processes calibrate every preset to the parameters of one process on the same images.

The calibration set is 5 global batches of 2 images; rank 0 observes batches 0, 2, 4 and rank 1
batches 1, 3 (``shard_batches``), so the ranks hold unequal shares and rank 0 has the last batch.
One ``mp.spawn`` runs the whole preset matrix; each preset is then compared on its own.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fqvit_det.calibration import CalibrationRunner, shard_batches
from fqvit_det.convert import quantize_model
from fqvit_det.presets import GELU_MIN, make_spec
from fqvit_det.state import quant_state_dict

from .helpers import images, tiny_vit

FAST_SEARCH = dict(images=10, rounds=1, grid_n=20, eq_n=16, top_k=4, levels=3, max_rows=256,
                   attn_images=2, attn_rows=64, confirm=2, screen_rows=64)
ROLE_MIX = dict(attn_probs=dict(type='AdaLogQuantizer', bits=4),
                fc2_input=dict(type='TwinUniformGeluQuantizer', bits=6),
                ln_output=dict(type='UniformQuantizer', bits=6, ch_axis=-1,
                               observer=dict(type='PercentileSearchObserver')))
# Small AdaLog pools: keeps the quantizers' own grid search fast and makes the pools drop their
# oldest batches, which the merge must reproduce in global order.
ADALOG_POOLS = dict(attn_probs=dict(type='AdaLogQuantizer', bits=4, max_samples=2048),
                    fc2_input=dict(type='AdaLogQuantizer', bits=4, shift=GELU_MIN, max_samples=2048))
PRESETS = {
    **{f'fqvit_ptf_lis_{obs}': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4, observer=obs,
                                    ptf=True, lis=True)
       for obs in ('minmax', 'ema', 'percentile', 'omse')},
    'ptq4vit_hessian': dict(method='ptq4vit', w_bits=6, a_bits=6, search_cfg=FAST_SEARCH),
    'repq': dict(method='repq', w_bits=4, a_bits=4),
    'adalog_fpcs': dict(method='adalog', w_bits=4, a_bits=4, search_cfg=FAST_SEARCH,
                        roles=ADALOG_POOLS),
    # GPTQ weights after the RepQ reparameterization: per-batch Hessians merged in global order
    'repq_gptq': dict(method='repq', w_bits=4, a_bits=4,
                      roles=dict(weight=dict(type='GPTQWeightQuantizer', bits=4),
                                 head_weight=dict(type='GPTQWeightQuantizer', bits=4,
                                                  act_order=True))),
    'role_mix': dict(method='fqvit', w_bits=6, a_bits=6, attn_bits=4, observer='ema', ptf=True,
                     roles=ROLE_MIX),
}


def _batches():
    x = images(tiny_vit(), 10, seed=3)
    return [x[i:i + 2] for i in range(0, 10, 2)]


def calibrate(preset, batches):
    """(saved-state tensors, output on a probe batch) after calibrating ``preset``."""
    model = tiny_vit()
    spec = make_spec(**PRESETS[preset])
    quantize_model(model, spec)
    CalibrationRunner(model, spec, progress=False).run(batches)
    with torch.no_grad():
        out = model(images(model, 3, seed=9))
    return dict(state=quant_state_dict(model), out=out)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        batches = shard_batches(_batches())
        assert len(batches) == (3 if rank == 0 else 2)
        torch.save({p: calibrate(p, batches) for p in PRESETS}, f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_process_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('dist') / 'state')
    # fork: the workers reuse this process's imports (spawn would re-import torch, timm, mmdet)
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method='fork')
    return [torch.load(f'{out}.{rank}', weights_only=True) for rank in range(2)]


@pytest.mark.parametrize('preset', PRESETS)
def test_two_process_gloo_equals_single_process(preset, two_process_results):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: same kernels, same rounding
    try:
        single = calibrate(preset, _batches())
    finally:
        torch.set_num_threads(threads)
    for rank, results in enumerate(two_process_results):
        got = results[preset]
        assert got['state'].keys() == single['state'].keys()
        for k, v in single['state'].items():
            assert got['state'][k].dtype == v.dtype and torch.equal(got['state'][k], v), \
                f'{preset}, rank {rank}: {k} differs from one process'
        assert torch.equal(got['out'], single['out']), f'{preset}, rank {rank}: outputs differ'
    if preset == 'repq':  # the reparameterization rewrote module parameters, saved and compared
        assert any(k.startswith('module/') for k in single['state'])


def test_shard_batches_takes_every_world_th_global_batch():
    assert shard_batches(list(range(5)), 0, 2) == [0, 2, 4]
    assert shard_batches(list(range(5)), 1, 2) == [1, 3]
    assert shard_batches(list(range(2)), 2, 3) == []
