"""Distributed calibration that ends bit-identical on every rank and equal to one process.

Sharding is by *batch*: with W ranks, rank r calibrates on global batches r, r + W, r + 2W, … of
the single-process batch sequence (``shard_batches``; the mm glue builds its loader the same way).
Each batch therefore has the same images, in the same order, as in one process, so every
per-batch statistic a rank computes is bit-equal to the single-process one. Sharding by *sample*
(mmengine's ``DefaultSampler``) would give rank r the images r, r + W, … and change every batch.

Strategy per calibration step:

1. **Observation** (every rank, its own batches) → **exact merge**: each activation quantizer's
   ``calibration_stats()`` is all-gathered (``all_gather_object``) and
   ``merge_calibration_stats`` rebuilds, in global batch order, the statistics one process holds
   after all batches (MinMax: min / max; EMA and percentile-EMA: per-batch values folded in
   global order; PTF / OMSE: the globally last batch; pools: interleaved). Every rank loads the
   merged statistics (``load_calibration_stats``).
2. **Weights and finalize**: computed on every rank from identical weights and merged statistics.
3. **RepQ reparameterization**: run on every rank (it rewrites LayerNorm / Linear parameters and
   per-tensor output quantizers the same way everywhere).
4. **Layer search** (PTQ4ViT Hessian grid, AdaLog FPCS): *computed on rank 0* over the whole
   calibration set — the other ranks' batches are gathered to rank 0 (``gather_batches``, global
   order) — while the other ranks wait.
5. **GPTQ weights** (when a weight role is ``GPTQWeightQuantizer``): every rank runs its batches
   through the calibrated model, the per-batch Hessians of the layer inputs are merged exactly
   like step 1 (interleaved into global order, summed in that order at finalize) and every rank
   finalizes them.
6. **Bias correction** (``quant_cfg.bias_correction``): computed on rank 0 from the gathered
   batches, like the search.
7. **Broadcast**: rank 0's final parameters (every quantizer's ``get_params()``, the module
   parameters the reparameterization rewrote and the bias corrections) are broadcast and set on
   every other rank, so all
   ranks end bit-identical to rank 0 even where devices round differently.

Only ``torch.distributed`` is used (no mmengine); every function is a no-op with one process.
"""
from typing import Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..walk import activation_quantizers, named_quantizers, refresh


def world_info():
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world_info()[1] > 1


def shard_indices(num_batches: int, rank: int, world: int) -> List[int]:
    """Global batch indices rank ``rank`` of ``world`` calibrates on: r, r + W, r + 2W, …"""
    return list(range(rank, num_batches, world))


def shard_batches(batches: Sequence, rank: Optional[int] = None, world: Optional[int] = None):
    """This rank's share of a global batch sequence (see the module docstring)."""
    if rank is None or world is None:
        rank, world = world_info()
    return [batches[i] for i in shard_indices(len(batches), rank, world)]


def _object_device():
    """Where collective object transfers stage their bytes (nccl needs the current CUDA device)."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return None


def to_cpu(obj):
    """``obj`` with every tensor (also inside dicts, lists, tuples and data samples) on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, '_fields'):
        return type(obj)(to_cpu(v) for v in obj)
    if hasattr(obj, 'cpu') and callable(obj.cpu):  # mmengine data elements
        return obj.cpu()
    return obj


def merge_observations(model: nn.Module) -> None:
    """Step 1: make every rank hold the statistics one process would hold after all batches."""
    merge_quantizer_stats(q for _, q in activation_quantizers(model))


def merge_quantizer_stats(quantizers) -> None:
    """Exact merge of these quantizers' statistics (the same list, in the same order, on every
    rank): all-gather, ``merge_calibration_stats``, load. Also the GPTQ step's Hessians."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for q in quantizers:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, to_cpu(q.calibration_stats()))
        q.load_calibration_stats(q.merge_calibration_stats(per_rank))


def gather_batches(batches: Iterable, src: int = 0) -> Optional[list]:
    """Step 4: all ranks' batches in global order on rank ``src`` (None on the other ranks).

    ``batches`` on rank r are its share (global batches r, r + W, …)."""
    if not is_distributed():
        return list(batches)
    local = [to_cpu(b) for b in batches]
    rank, world = world_info()
    per_rank = [None] * world if rank == src else None
    dist.gather_object(local, per_rank, dst=src)
    if rank != src:
        return None
    longest = max(len(p) for p in per_rank)
    return [p[i] for i in range(longest) for p in per_rank if i < len(p)]


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def calibrated_params(model: nn.Module) -> dict:
    """Everything calibration produced: quantizer parameters and rewritten module parameters."""
    from .bias_correction import bias_corrections
    from .reparam import rewritten_module_params
    return dict(quantizers={name: {k: v.detach().cpu() for k, v in q.get_params().items()}
                            for name, q in named_quantizers(model)},
                modules=rewritten_module_params(model), bias_corrections=bias_corrections(model))


def apply_params(model: nn.Module, state: dict) -> None:
    """Set what ``calibrated_params`` returned (quantizers by ``set_params``)."""
    quantizers = dict(named_quantizers(model))
    for name, params in state['quantizers'].items():
        quantizers[name].set_params(**params)
    with torch.no_grad():
        for key, value in state['modules'].items():
            param = model.get_parameter(key) if _is_param(model, key) else model.get_buffer(key)
            param.copy_(value.to(param.device))
    from .bias_correction import set_bias_corrections
    set_bias_corrections(model, state.get('bias_corrections', {}))
    refresh(model)


def _is_param(model, key):
    try:
        model.get_parameter(key)
        return True
    except AttributeError:
        return False


def broadcast_calibration(model: nn.Module, src: int = 0) -> None:
    """Step 5: every rank takes rank ``src``'s calibrated parameters."""
    if not is_distributed():
        return
    rank, _ = world_info()
    state = broadcast_object(calibrated_params(model) if rank == src else None, src)
    if rank != src:
        apply_params(model, state)
