"""Distributed calibration: reduce observer statistics so all ranks finalize identically."""
import torch
import torch.distributed as dist

from ..calibration import activation_quantizers


def reduce_observers(model) -> None:
    """All-reduce running min/max (MinMax-style statistics) and gather pooled samples.

    A no-op when torch.distributed is not initialised (single process).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for _, q in activation_quantizers(model):
        for obs in q.modules():
            if hasattr(obs, 'reduce_distributed'):
                obs.reduce_distributed()
            elif hasattr(obs, 'min_val') and hasattr(obs, 'max_val'):
                dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN)
                dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX)
                nb = obs.num_batches.clone()
                dist.all_reduce(nb)
                obs.num_batches.copy_(nb)
                pool = getattr(obs, '_pool', None)
                if pool:
                    gathered = [None] * dist.get_world_size()
                    dist.all_gather_object(gathered, [p.cpu() for p in pool])
                    obs._pool = [p for rank_pool in gathered for p in rank_pool]
                last = getattr(obs, '_last', None)
                if last is not None:
                    gathered = [None] * dist.get_world_size()
                    dist.all_gather_object(gathered, last.cpu())
                    obs._last = torch.cat([g.reshape(-1, *last.shape[1:]) for g in gathered]) \
                        if last.dim() > 0 else last
