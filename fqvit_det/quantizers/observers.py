"""Range observers (FQ-ViT §3 calibration, RepQ-ViT percentile search).

An observer sees calibration tensors through ``update(x)`` and returns a range with
``compute_range(range_error)``. ``range_error(min, max, x, ch_axis)`` is supplied by the quantizer
and returns the per-channel (or scalar) MSE of quantizing ``x`` with that range, so search-based
observers (OMSE, percentile search) stay independent of the quantizer's formula.
Per-channel observers reduce over every axis except ``ch_axis``; calls of different shapes (an
FPN head called once per level) aggregate as long as the channel count matches.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from .base import reduce_dims, resize_buffers_for_load
from .registry import register_observer


def channels_first_flat(x: torch.Tensor, ch_axis: Optional[int]) -> torch.Tensor:
    """``[N]`` for per-tensor, ``[C, N]`` for per-channel."""
    if ch_axis is None:
        return x.reshape(-1)
    return x.movedim(ch_axis % x.dim(), 0).reshape(x.shape[ch_axis], -1)


def quantile_kth(flat: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile by order statistic (no size limit, unlike ``torch.quantile``)."""
    n = flat.shape[-1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return flat.float().kthvalue(k, dim=-1).values


def tail_quantiles(flat: torch.Tensor, probs: Sequence[float]):
    """[(q_{1-p}, q_p) for p in probs], the same order statistics as ``quantile_kth``.

    Only the tails are needed, so one ``topk`` per side replaces a selection per quantile.
    """
    flat = flat.float()
    n = flat.shape[-1]
    k_lo = [min(max(int(round((1 - p) * (n - 1))) + 1, 1), n) for p in probs]
    k_hi = [n - min(max(int(round(p * (n - 1))) + 1, 1), n) + 1 for p in probs]
    k_max = max(k_lo + k_hi)
    if 4 * k_max >= n:
        return [(quantile_kth(flat, 1 - p), quantile_kth(flat, p)) for p in probs]
    smallest = flat.topk(k_max, dim=-1, largest=False, sorted=True).values
    largest = flat.topk(k_max, dim=-1, largest=True, sorted=True).values
    return [(smallest[..., kl - 1], largest[..., kh - 1]) for kl, kh in zip(k_lo, k_hi)]


class Observer(nn.Module):
    def __init__(self, ch_axis: Optional[int] = None):
        super().__init__()
        self.ch_axis = ch_axis
        self.register_buffer('min_val', torch.tensor(float('inf')))
        self.register_buffer('max_val', torch.tensor(float('-inf')))
        self.register_buffer('num_batches', torch.tensor(0))

    def reset_stats(self):
        self.min_val = torch.tensor(float('inf'), device=self.min_val.device)
        self.max_val = torch.tensor(float('-inf'), device=self.max_val.device)
        self.num_batches.zero_()
        for attr in ('_last', '_pool'):
            if hasattr(self, attr):
                setattr(self, attr, None if attr == '_last' else [])

    def batch_min_max(self, x):
        dims = reduce_dims(x, self.ch_axis)
        return x.amin(dim=dims), x.amax(dim=dims)

    def _check_channels(self, new):
        if self.num_batches > 0 and self.min_val.shape != new.shape:
            raise ValueError(f'{type(self).__name__}: channel count changed between calibration '
                             f'batches ({tuple(self.min_val.shape)} vs {tuple(new.shape)})')

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Per-channel min/max are [C] after calibration but scalars in a fresh observer.
        resize_buffers_for_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def compute_range(self, range_error=None):
        if int(self.num_batches) == 0:
            raise RuntimeError(f'{type(self).__name__}: no calibration data was observed')
        return self.min_val.clone(), self.max_val.clone()


@register_observer()
class MinMaxObserver(Observer):
    """Running global min / max over all calibration batches."""

    def update(self, x):
        mn, mx = self.batch_min_max(x)
        self._check_channels(mn)
        if int(self.num_batches) == 0:
            self.min_val, self.max_val = mn.clone(), mx.clone()
        else:
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)
        self.num_batches += 1


def ema_update(old: torch.Tensor, new: torch.Tensor, sigma: float) -> torch.Tensor:
    """m ← m + σ (m_cur − m)  (FQ-ViT EMA, σ = 0.01)."""
    return old + sigma * (new - old)


@register_observer()
class EMAObserver(Observer):
    """Exponential moving average of per-batch min / max (σ = 0.01); the first batch initialises."""

    def __init__(self, ch_axis=None, sigma: float = 0.01):
        super().__init__(ch_axis)
        self.sigma = sigma

    def batch_range(self, x):
        return self.batch_min_max(x)

    def update(self, x):
        mn, mx = self.batch_range(x)
        self._check_channels(mn)
        if int(self.num_batches) == 0:
            self.min_val, self.max_val = mn.clone(), mx.clone()
        else:
            self.min_val = ema_update(self.min_val, mn, self.sigma)
            self.max_val = ema_update(self.max_val, mx, self.sigma)
        self.num_batches += 1


@register_observer()
class PercentileObserver(EMAObserver):
    """Per-batch 1e-5 / (1 − 1e-5) quantiles, EMA-smoothed with σ = 0.01 (FQ-ViT Percentile)."""

    def __init__(self, ch_axis=None, sigma: float = 0.01, tail: float = 1e-5):
        super().__init__(ch_axis, sigma)
        if not 0 <= tail < 0.5:
            raise ValueError(f'PercentileObserver: tail must be in [0, 0.5), got {tail}')
        self.tail = tail

    def batch_range(self, x):
        flat = channels_first_flat(x, self.ch_axis)
        return tail_quantiles(flat, [1 - self.tail])[0]


class LastBatchMixin:
    """Keeps the most recent calibration batch for a range search at ``compute_range``."""

    def remember(self, x):
        self._last = x.detach().clone()

    def last_batch(self):
        if getattr(self, '_last', None) is None:
            raise RuntimeError(f'{type(self).__name__}: the search needs the last calibration batch, '
                               'which is not kept in a saved state; recalibrate instead')
        return self._last


@register_observer()
class OMSEObserver(MinMaxObserver, LastBatchMixin):
    """MinMax range shrunk by the best of 90 factors (1 − 0.01 i), i = 0..89, by MSE on the last batch."""

    def __init__(self, ch_axis=None, num_candidates: int = 90, step: float = 0.01):
        super().__init__(ch_axis)
        self.num_candidates = num_candidates
        self.step = step

    def update(self, x):
        super().update(x)
        self.remember(x)

    def compute_range(self, range_error=None):
        min_val, max_val = super().compute_range()
        if range_error is None:
            return min_val, max_val
        x = self.last_batch()
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


@register_observer()
class PercentileSearchObserver(Observer):
    """RepQ-ViT: clip to the (1 − p, p) quantiles for p ∈ {0.999, 0.9999, 0.99999}; keep the least MSE.

    Samples from every calibration batch are pooled (flattened per channel), so several batches
    behave like RepQ's single 32-image batch. Pooled samples are capped at ``max_samples`` per
    channel (the most recent are kept) to bound memory.
    """

    def __init__(self, ch_axis=None, percentiles: Sequence[float] = (0.999, 0.9999, 0.99999),
                 max_samples: int = 2 ** 22):
        super().__init__(ch_axis)
        self.percentiles = tuple(percentiles)
        self.max_samples = max_samples
        self._pool = []

    def update(self, x):
        mn, mx = self.batch_min_max(x)
        self._check_channels(mn)
        self.min_val = mn.clone() if int(self.num_batches) == 0 else torch.minimum(self.min_val, mn)
        self.max_val = mx.clone() if int(self.num_batches) == 0 else torch.maximum(self.max_val, mx)
        self.num_batches += 1
        self._pool.append(channels_first_flat(x.detach().float(), self.ch_axis).clone())
        total = sum(p.shape[-1] for p in self._pool)
        while len(self._pool) > 1 and total - self._pool[0].shape[-1] >= self.max_samples:
            total -= self._pool.pop(0).shape[-1]

    def compute_range(self, range_error=None):
        min_val, max_val = super().compute_range()
        if not self._pool:
            return min_val, max_val
        flat = torch.cat(self._pool, dim=-1)
        if flat.shape[-1] > self.max_samples:
            flat = flat[..., -self.max_samples:]
        if range_error is None:
            p = self.percentiles[-1]
            return quantile_kth(flat, 1 - p), quantile_kth(flat, p)
        best = None
        for lo, hi in tail_quantiles(flat, self.percentiles):
            err = range_error(lo, hi, flat, None if self.ch_axis is None else 0)
            if best is None:
                best = (err, lo, hi)
                continue
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, lo, best[1]),
                    torch.where(better, hi, best[2]))
        self._pool = []
        return best[1], best[2]
