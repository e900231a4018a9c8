"""Calibration statistics that merge exactly across data-parallel ranks.

Rank r of W observes the global batches r, r + W, r + 2W, … (round robin), so its local batch i is
global batch i·W + r. The helpers here rebuild, from the per-rank statistics, exactly what one
process that observed every batch in global order would hold:

* ``check_round_robin`` – the per-rank batch counts must be those of a round-robin split;
* ``interleave``        – per-batch lists (EMA inputs) into global order;
* ``BatchPool``         – per-batch samples keeping the most recent ones (oldest batches dropped);
* ``ThinnedPool``       – per-batch samples, all batches kept, thinned by powers of two;
* ``last_of``           – the rank that holds the globally last batch.

Statistics are plain values (CPU tensors, lists of tensors, ints, ``None``), so they pickle.
"""
from typing import Callable, List, Optional, Sequence

import torch


def to_cpu(t):
    if t is None:
        return None
    return t.detach().cpu().clone()


def to_device(t, device):
    if t is None:
        return None
    return torch.as_tensor(t).detach().to(device).clone()


def check_round_robin(counts: Sequence[int], who: str = 'merge_calibration_stats') -> int:
    """Total batch count; raises ``ValueError`` unless rank r holds ⌈(N − r)/W⌉ of N batches."""
    counts = [int(c) for c in counts]
    if not counts:
        raise ValueError(f'{who}: no per-rank statistics given')
    world, total = len(counts), sum(counts)
    expected = [-(-(total - r) // world) for r in range(world)]
    if counts != expected:
        raise ValueError(f'{who}: per-rank batch counts {counts} are not a round-robin split of '
                         f'{total} batches over {world} ranks (expected {expected})')
    return total


def interleave(per_rank: Sequence[Sequence]) -> list:
    """Complete per-batch lists of each rank → one list in global batch order (i·W + r)."""
    longest = max((len(p) for p in per_rank), default=0)
    return [p[i] for i in range(longest) for p in per_rank if i < len(p)]


def last_of(counts: Sequence[int]) -> Optional[int]:
    """The rank that observed the globally last batch (``None`` when nothing was observed)."""
    total = sum(int(c) for c in counts)
    return None if total == 0 else (total - 1) % len(counts)


class BatchPool:
    """Per-batch samples, the most recent kept: after each batch the oldest batches are dropped
    while the remaining ones still hold at least ``max_samples`` samples (``size`` of a batch).

    Exactly mergeable: a batch a rank dropped is also dropped by a single process (the rank's
    later batches are a subset of the global later batches), so the ranks' kept batches, put in
    global order and pruned by the same rule, are the single process's pool.
    """

    def __init__(self, max_samples: int, size: Callable[[torch.Tensor], int] = torch.numel):
        self.max_samples = int(max_samples)
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.items: List[torch.Tensor] = []
        self.num_batches = 0

    def append(self, t: torch.Tensor) -> None:
        self.items.append(t)
        self.num_batches += 1
        self.items = self._prune(self.items)

    def _prune(self, items):
        sizes = [self.size(t) for t in items]
        total, start = sum(sizes), 0
        while len(items) - start > 1 and total - sizes[start] >= self.max_samples:
            total -= sizes[start]
            start += 1
        return items[start:]

    def stats(self) -> dict:
        return {'num_batches': self.num_batches, 'pool': [to_cpu(t) for t in self.items]}

    def load(self, stats: dict, device) -> None:
        self.num_batches = int(stats['num_batches'])
        self.items = [to_device(t, device) for t in stats['pool']]

    def merge(self, per_rank: Sequence[dict], who: str) -> dict:
        counts = [int(s['num_batches']) for s in per_rank]
        total = check_round_robin(counts, who)
        world = len(per_rank)
        indexed = []
        for r, s in enumerate(per_rank):
            kept = list(s['pool'])
            first = counts[r] - len(kept)          # local index of the oldest kept batch
            indexed += [((first + i) * world + r, t) for i, t in enumerate(kept)]
        indexed.sort(key=lambda it: it[0])
        return {'num_batches': total, 'pool': self._prune([t for _, t in indexed])}


class ThinnedPool:
    """Per-batch samples of every batch, all thinned by the same power of two.

    Batch b keeps ``S_b[::2^k]`` (``S_b`` its own samples), with k the smallest exponent that
    brings the total to at most ``max_samples`` (or leaves no piece longer than one). Every
    batch weighs equally per value, and the result depends only on the set of batches, so the
    merge is exact (x[::2^a][::2^b] == x[::2^(a+b)]).
    """

    def __init__(self, max_samples: int):
        self.max_samples = int(max_samples)
        self.reset()

    def reset(self) -> None:
        self.items: List[torch.Tensor] = []
        self.num_batches = 0
        self.thin_exp = 0

    def append(self, t: torch.Tensor) -> None:
        self.items.append(t[::2 ** self.thin_exp])
        self.num_batches += 1
        self.items, self.thin_exp = self._thin(self.items, self.thin_exp)

    def _thin(self, items, k):
        while (sum(t.numel() for t in items) > self.max_samples
               and any(t.numel() > 1 for t in items)):
            items = [t[::2] for t in items]
            k += 1
        return items, k

    def stats(self) -> dict:
        return {'num_batches': self.num_batches, 'thin_exp': self.thin_exp,
                'pool': [to_cpu(t) for t in self.items]}

    def load(self, stats: dict, device) -> None:
        self.num_batches = int(stats['num_batches'])
        self.thin_exp = int(stats['thin_exp'])
        self.items = [to_device(t, device) for t in stats['pool']]

    def merge(self, per_rank: Sequence[dict], who: str) -> dict:
        total = check_round_robin([s['num_batches'] for s in per_rank], who)
        k = max(int(s['thin_exp']) for s in per_rank)
        pieces = [[t[::2 ** (k - int(s['thin_exp']))] for t in s['pool']] for s in per_rank]
        items, k = self._thin(interleave(pieces), k)
        return {'num_batches': total, 'thin_exp': k, 'pool': items}


class PooledStatsMixin:
    """The calibration-statistics interface of a quantizer whose statistics are one pool
    (``self._pool``: a ``BatchPool`` or ``ThinnedPool``) of per-batch samples."""

    def reset_stats(self):
        self._pool.reset()

    @property
    def num_observed(self) -> int:
        return self._pool.num_batches

    def calibration_stats(self):
        """``{'num_batches', 'pool': the kept per-batch samples, oldest first}`` (plus the pool's
        own bookkeeping, e.g. ``ThinnedPool``'s ``thin_exp``)."""
        return self._pool.stats()

    def load_calibration_stats(self, stats):
        self._pool.load(stats, self.device)

    def merge_calibration_stats(self, per_rank):
        return self._pool.merge(per_rank, self.qname)
