"""Range observers (FQ-ViT §3 calibration, RepQ-ViT percentile search).

An observer sees calibration tensors through ``update(x)`` and returns a range with
``compute_range(range_error)``. ``range_error(min, max, x, ch_axis)`` is supplied by the quantizer
and returns the per-channel (or scalar) MSE of quantizing ``x`` with that range, so search-based
observers (OMSE, percentile search) stay independent of the quantizer's formula.
Per-channel observers reduce over every axis except ``ch_axis``; calls of different shapes (an
FPN head called once per level) aggregate as long as the channel count matches.

Statistics are plain attributes (not in the ``state_dict``), exported by ``stats()``, merged across
data-parallel ranks by ``merge_stats`` (exact: see ``stats.py``) and loaded by ``load_stats``.
Order-dependent observers (EMA, Percentile) keep their per-batch values and fold the EMA in
``compute_range``; OMSE keeps the last batch.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from .base import check_ch_axis, check_float, check_int, check_percentiles, reduce_dims
from .registry import register_observer
from .stats import BatchPool, check_round_robin, interleave, last_of, to_cpu, to_device


def channels_first_flat(x: torch.Tensor, ch_axis: Optional[int]) -> torch.Tensor:
    """``[N]`` for per-tensor, ``[C, N]`` for per-channel."""
    if ch_axis is None:
        return x.reshape(-1)
    return x.movedim(ch_axis % x.dim(), 0).reshape(x.shape[ch_axis], -1)


def _quantile_ranks(n: int, q: float, dtype: torch.dtype):
    """torch.quantile's ranks: r = q·(n − 1) in the input's dtype, below = trunc(r), above = ⌈r⌉,
    weight = r − below."""
    rank = torch.tensor(q, dtype=dtype) * (n - 1)
    below = int(rank)
    above = int(torch.ceil(rank))
    return below, above, rank - below


def quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(flat, q, dim=-1)`` (linear interpolation) bit for bit, without its input
    size limit: the two order statistics around q·(n − 1) by ``kthvalue``, then ``torch.lerp``.
    ``flat`` is float; reduces the last dim."""
    return quantiles(flat, [q])[0]


def quantiles(flat: torch.Tensor, probs: Sequence[float]):
    """[``quantile(flat, p)`` for p in probs]. Tail probabilities share one ``topk`` per side."""
    flat = flat if flat.is_floating_point() else flat.float()
    n = flat.shape[-1]
    if n == 0:
        raise ValueError('quantile: empty input')
    ranks = [_quantile_ranks(n, p, flat.dtype) for p in probs]
    ks = sorted({k for below, above, _ in ranks for k in (below, above)})
    # order statistics needed, 0-based; the tails come from topk, the rest from kthvalue
    lo_k = [k for k in ks if k < n // 4]
    hi_k = [k for k in ks if k >= n - n // 4 and k not in lo_k]
    stat = {}
    if lo_k:
        smallest = flat.topk(max(lo_k) + 1, dim=-1, largest=False, sorted=True).values
        stat.update({k: smallest[..., k] for k in lo_k})
    if hi_k:
        largest = flat.topk(n - min(hi_k), dim=-1, largest=True, sorted=True).values
        stat.update({k: largest[..., n - 1 - k] for k in hi_k})
    for k in ks:
        if k not in stat:
            stat[k] = flat.kthvalue(k + 1, dim=-1).values
    out = []
    for below, above, weight in ranks:
        lo, hi = stat[below], stat[above]
        out.append(torch.lerp(lo, hi, weight.to(lo.device)))
    return out


def tail_quantiles(flat: torch.Tensor, probs: Sequence[float]):
    """[(quantile(1 − p), quantile(p)) for p in probs]."""
    qs = quantiles(flat, [v for p in probs for v in (1 - p, p)])
    return [(qs[2 * i], qs[2 * i + 1]) for i in range(len(probs))]


class Observer(nn.Module):
    """Base observer: batch count, per-channel shape checks, the statistics interface."""

    def __init__(self, ch_axis: Optional[int] = None):
        super().__init__()
        self.ch_axis = check_ch_axis(self, ch_axis)
        self.reset_stats()

    @property
    def num_batches(self) -> int:
        return self._num_batches

    def reset_stats(self) -> None:
        self._num_batches = 0
        self._shape = None

    def batch_min_max(self, x):
        dims = reduce_dims(x, self.ch_axis)
        return x.amin(dim=dims), x.amax(dim=dims)

    def _check_channels(self, new):
        if self._shape is not None and tuple(new.shape) != self._shape:
            raise ValueError(f'{type(self).__name__}: channel count changed between calibration '
                             f'batches ({self._shape} vs {tuple(new.shape)})')
        self._shape = tuple(new.shape)

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _require_data(self):
        if self._num_batches == 0:
            raise RuntimeError(f'{type(self).__name__}: no calibration data was observed')

    def compute_range(self, range_error=None):
        raise NotImplementedError

    # statistics: {'num_batches': int, ...}
    def stats(self) -> dict:
        raise NotImplementedError

    def load_stats(self, stats: dict, device=None) -> None:
        raise NotImplementedError

    def merge_stats(self, per_rank: Sequence[dict]) -> dict:
        raise NotImplementedError


@register_observer()
class MinMaxObserver(Observer):
    """Running global min / max over all calibration batches."""

    def reset_stats(self):
        super().reset_stats()
        self._min = self._max = None

    def update(self, x):
        mn, mx = self.batch_min_max(x)
        self._check_channels(mn)
        if self._min is None:
            self._min, self._max = mn.clone(), mx.clone()
        else:
            self._min = torch.minimum(self._min, mn)
            self._max = torch.maximum(self._max, mx)
        self._num_batches += 1

    def compute_range(self, range_error=None):
        self._require_data()
        return self._min.clone(), self._max.clone()

    def stats(self):
        return {'num_batches': self._num_batches, 'min': to_cpu(self._min),
                'max': to_cpu(self._max)}

    def load_stats(self, stats, device=None):
        self.reset_stats()
        self._num_batches = int(stats['num_batches'])
        self._min, self._max = to_device(stats['min'], device), to_device(stats['max'], device)
        self._shape = None if self._min is None else tuple(self._min.shape)

    def merge_stats(self, per_rank):
        total = check_round_robin([s['num_batches'] for s in per_rank], type(self).__name__)
        mins = [s['min'] for s in per_rank if s['min'] is not None]
        maxs = [s['max'] for s in per_rank if s['max'] is not None]
        if len({tuple(m.shape) for m in mins}) > 1:
            raise ValueError(f'{type(self).__name__}: ranks disagree on the channel count: '
                             f'{[tuple(m.shape) for m in mins]}')
        mn = mx = None
        for a, b in zip(mins, maxs):   # min / max are exact in any order
            mn = a.clone() if mn is None else torch.minimum(mn, a)
            mx = b.clone() if mx is None else torch.maximum(mx, b)
        return {'num_batches': total, 'min': mn, 'max': mx}


def ema_update(old: torch.Tensor, new: torch.Tensor, sigma: float) -> torch.Tensor:
    """m ← m + σ (m_cur − m)  (FQ-ViT EMA, σ = 0.01)."""
    return old + sigma * (new - old)


@register_observer()
class EMAObserver(Observer):
    """Exponential moving average of per-batch min / max (σ = 0.01); the first batch initialises.

    The per-batch min / max are kept (two [C] or scalar tensors per batch) and folded in batch
    order by ``compute_range``, so statistics of several ranks merge exactly.
    """

    def __init__(self, ch_axis=None, sigma: float = 0.01):
        super().__init__(ch_axis)
        self.sigma = check_float(self, 'sigma', sigma, 0.0, 1.0, lo_open=True)

    def reset_stats(self):
        super().reset_stats()
        self._mins, self._maxs = [], []

    def batch_range(self, x):
        return self.batch_min_max(x)

    def update(self, x):
        mn, mx = self.batch_range(x)
        self._check_channels(mn)
        self._mins.append(mn.detach().clone())
        self._maxs.append(mx.detach().clone())
        self._num_batches += 1

    def compute_range(self, range_error=None):
        self._require_data()
        mn, mx = self._mins[0].clone(), self._maxs[0].clone()
        for a, b in zip(self._mins[1:], self._maxs[1:]):
            mn = ema_update(mn, a, self.sigma)
            mx = ema_update(mx, b, self.sigma)
        return mn, mx

    def stats(self):
        return {'num_batches': self._num_batches, 'batch_min': [to_cpu(t) for t in self._mins],
                'batch_max': [to_cpu(t) for t in self._maxs]}

    def load_stats(self, stats, device=None):
        self.reset_stats()
        self._num_batches = int(stats['num_batches'])
        self._mins = [to_device(t, device) for t in stats['batch_min']]
        self._maxs = [to_device(t, device) for t in stats['batch_max']]
        self._shape = tuple(self._mins[0].shape) if self._mins else None

    def merge_stats(self, per_rank):
        total = check_round_robin([s['num_batches'] for s in per_rank], type(self).__name__)
        return {'num_batches': total,
                'batch_min': interleave([s['batch_min'] for s in per_rank]),
                'batch_max': interleave([s['batch_max'] for s in per_rank])}


@register_observer()
class PercentileObserver(EMAObserver):
    """Per-batch 1e-5 / (1 − 1e-5) quantiles (as ``torch.quantile``), EMA-smoothed with σ = 0.01
    (FQ-ViT Percentile)."""

    def __init__(self, ch_axis=None, sigma: float = 0.01, tail: float = 1e-5):
        super().__init__(ch_axis, sigma)
        self.tail = check_float(self, 'tail', tail, 0.0, 0.5, hi_open=True)

    def batch_range(self, x):
        flat = channels_first_flat(x.float(), self.ch_axis)
        return tail_quantiles(flat, [1 - self.tail])[0]


@register_observer()
class OMSEObserver(MinMaxObserver):
    """MinMax range shrunk by the best of 90 factors (1 − 0.01 i), i = 0..89, by MSE on the last
    batch (kept until ``compute_range``)."""

    def __init__(self, ch_axis=None, num_candidates: int = 90, step: float = 0.01):
        super().__init__(ch_axis)
        self.num_candidates = check_int(self, 'num_candidates', num_candidates, 1)
        self.step = check_float(self, 'step', step, 0.0, 1.0, lo_open=True)
        if self.step * (self.num_candidates - 1) >= 1:
            raise ValueError(f'OMSEObserver: step·(num_candidates − 1) must be < 1 (the factors '
                             f'1 − step·i must stay positive), got step={step}, '
                             f'num_candidates={num_candidates}')

    def reset_stats(self):
        super().reset_stats()
        self._last = None

    def update(self, x):
        super().update(x)
        self._last = x.detach().clone()

    def stats(self):
        return {**super().stats(), 'last': to_cpu(self._last)}

    def load_stats(self, stats, device=None):
        super().load_stats(stats, device)
        self._last = to_device(stats['last'], device)

    def merge_stats(self, per_rank):
        merged = super().merge_stats(per_rank)
        r = last_of([s['num_batches'] for s in per_rank])
        merged['last'] = None if r is None else per_rank[r]['last']
        return merged

    def compute_range(self, range_error=None):
        min_val, max_val = super().compute_range()
        if range_error is None:
            return min_val, max_val
        if self._last is None:
            raise RuntimeError('OMSEObserver: the search needs the last calibration batch, which '
                               'finalize() already released (or a saved state does not keep); '
                               'observe again')
        x = self._last
        best_err, best_min, best_max = None, min_val, max_val
        for i in range(self.num_candidates):
            factor = 1.0 - self.step * i
            cand_min, cand_max = min_val * factor, max_val * factor
            err = range_error(cand_min, cand_max, x, self.ch_axis)
            if best_err is None:
                best_err, best_min, best_max = err, cand_min, cand_max
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_min = torch.where(better, cand_min, best_min)
            best_max = torch.where(better, cand_max, best_max)
        self._last = None
        return best_min, best_max


def _samples_per_channel(t: torch.Tensor) -> int:
    """A pooled batch's samples per channel (its last dimension); a module-level function, not
    a lambda, so that models holding the observer pickle."""
    return t.shape[-1]


@register_observer()
class PercentileSearchObserver(Observer):
    """RepQ-ViT: clip to the (1 − p, p) quantiles (as ``torch.quantile``) for
    p ∈ {0.999, 0.9999, 0.99999}; keep the least MSE.

    Samples from every calibration batch are pooled (flattened per channel), so several batches
    behave like RepQ's single 32-image batch. Pooled samples are capped at ``max_samples`` per
    channel (the most recent are kept) to bound memory.
    """

    def __init__(self, ch_axis=None, percentiles: Sequence[float] = (0.999, 0.9999, 0.99999),
                 max_samples: int = 2 ** 22):
        super().__init__(ch_axis)
        self.percentiles = check_percentiles(self, percentiles)
        self.max_samples = check_int(self, 'max_samples', max_samples, 1)
        self._pool = BatchPool(self.max_samples, size=_samples_per_channel)

    def reset_stats(self):
        super().reset_stats()
        if hasattr(self, '_pool'):
            self._pool.reset()

    @property
    def num_batches(self) -> int:
        return self._pool.num_batches

    def update(self, x):
        flat = channels_first_flat(x.detach().float(), self.ch_axis).clone()
        self._check_channels(flat[..., 0])
        self._pool.append(flat)

    def stats(self):
        return self._pool.stats()

    def load_stats(self, stats, device=None):
        self.reset_stats()
        self._pool.load(stats, device)
        if self._pool.items:
            self._shape = tuple(self._pool.items[0].shape[:-1])

    def merge_stats(self, per_rank):
        return self._pool.merge(per_rank, type(self).__name__)

    def compute_range(self, range_error=None):
        if self._pool.num_batches == 0:
            raise RuntimeError('PercentileSearchObserver: no calibration data was observed')
        if not self._pool.items:
            raise RuntimeError('PercentileSearchObserver: the pooled samples were already released '
                               'by finalize(); observe again')
        flat = torch.cat(self._pool.items, dim=-1)
        if flat.shape[-1] > self.max_samples:
            flat = flat[..., -self.max_samples:]
        if range_error is None:
            return tail_quantiles(flat, self.percentiles[-1:])[0]
        best = None
        for lo, hi in tail_quantiles(flat, self.percentiles):
            err = range_error(lo, hi, flat, None if self.ch_axis is None else 0)
            if best is None:
                best = (err, lo, hi)
                continue
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, lo, best[1]),
                    torch.where(better, hi, best[2]))
        self._pool.items = []
        return best[1], best[2]
