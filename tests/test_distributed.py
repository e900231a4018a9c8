"""2-process gloo calibration ends with the same parameters as one process on the same images."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fqvit_det.calibration import CalibrationRunner, named_quantizers
from fqvit_det.convert import quantize_model
from fqvit_det.mm.distributed import reduce_observers
from fqvit_det.presets import make_spec

from .helpers import images, tiny_vit

PRESETS = {'minmax': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=8, ptf=False, lis=False),
           'repq': dict(method='repq', w_bits=6, a_bits=6)}


def calibrated_state(preset, batches, reduce_fn=None):
    model = tiny_vit()
    spec = make_spec(**PRESETS[preset])
    quantize_model(model, spec)
    CalibrationRunner(model, spec, reduce_fn=reduce_fn, progress=False).run(batches)
    return {f'{n}.{k}': v.clone() for n, q in named_quantizers(model) for k, v in q.state_dict().items()
            if not k.startswith('observer.') and k != 'num_batches'}


def _worker(rank, world, port, preset, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        batches = _batches()
        state = calibrated_state(preset, batches[rank::world], reduce_observers)
        torch.save(state, f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


def _batches():
    x = images(tiny_vit(), 8, seed=3)
    return [x[i:i + 2] for i in range(0, 8, 2)]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('preset', PRESETS)
def test_two_process_gloo_equals_single_process(preset, tmp_path):
    out = str(tmp_path / 'state')
    mp.spawn(_worker, args=(2, _free_port(), preset, out), nprocs=2, join=True)
    single = calibrated_state(preset, _batches())
    for rank in range(2):
        got = torch.load(f'{out}.{rank}', weights_only=True)
        assert got.keys() == single.keys()
        for k, v in single.items():
            assert torch.equal(got[k], v), f'rank {rank}: {k} differs'
