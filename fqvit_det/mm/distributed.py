"""Distributed calibration: reduce observer statistics so all ranks finalize identically.

Rank r of W calibrates on batches r, r + W, r + 2W, ... (mmengine's DefaultSampler without shuffle).
After observation every rank holds:
* running min / max (MinMax-style observers): all-reduced with MIN / MAX — exact;
* pooled samples (percentile search, log / twin / AdaLog quantizers): all-gathered and put back in
  the single-process batch order (batch i of rank r is global batch i·W + r) — exact;
* the last calibration batch (PTF factors, OMSE): the globally last batch — exact.
EMA / Percentile observers are order-dependent running averages: they are all-reduced as
min / max of the per-rank averages, which is not bit-equal to a single process.
"""
import torch
import torch.distributed as dist

from ..calibration import activation_quantizers


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _interleave(per_rank):
    """Lists indexed by local batch → one list in global batch order (i·W + r)."""
    longest = max((len(p) for p in per_rank), default=0)
    return [p[i] for i in range(longest) for p in per_rank if i < len(p)]


def _reduce_module(mod, local_batches: int) -> None:
    for name, op in (('min_val', dist.ReduceOp.MIN), ('max_val', dist.ReduceOp.MAX)):
        val = getattr(mod, name, None)
        if isinstance(val, torch.Tensor):
            val = val.clone()
            dist.all_reduce(val, op=op)
            setattr(mod, name, val)
    pool = getattr(mod, '_pool', None)
    if isinstance(pool, list):
        mod._pool = _interleave(_gather([t.cpu() for t in pool]))
    if hasattr(mod, '_last'):
        last = mod._last
        gathered = _gather((local_batches, None if last is None else last.cpu()))
        world = len(gathered)
        best = max((r for r, (n, t) in enumerate(gathered) if t is not None and n > 0),
                   key=lambda r: (gathered[r][0] - 1) * world + r, default=None)
        mod._last = None if best is None else gathered[best][1]
    nb = getattr(mod, 'num_batches', None)
    if isinstance(nb, torch.Tensor):
        total = nb.clone()
        dist.all_reduce(total)
        mod.num_batches = total


def reduce_observers(model) -> None:
    """Make every rank's activation statistics those of one process over all ranks' batches.

    A no-op when torch.distributed is not initialised or has one rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for _, q in activation_quantizers(model):
        for mod in q.modules():
            local = int(getattr(mod, 'num_batches', torch.tensor(0)))
            _reduce_module(mod, local)
