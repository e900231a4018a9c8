"""Logarithmic quantizers for post-softmax attention probabilities.

* ``Log2Quantizer``      – FQ-ViT's plain log2 quantizer: q = clamp(⌊−log2(x/Δ)⌉, 0, 2^b − 1),
  x̂ = Δ·2^−q.
* ``LogSqrt2Quantizer``  – RepQ-ViT's log√2 quantizer: q = clamp(⌊−2·log2(x/Δ)⌉, 0, 2^b − 1),
  x̂ = Δ·2^(−q/2), Δ from a percentile search; with the exact reparameterization to log2 codes
  plus a parity scale (``log_sqrt2_to_log2``; the integer P·V on these codes is
  ``fqvit_det.integer.attention.pow2_matmul``).
* FQ-ViT's Log-Int-Softmax (``LogIntSoftmax``) is in ``lis.py``.

Zero code
---------
Every entry whose code would be ≥ 2^b (this includes an input of exactly 0, negative inputs and NaN)
dequantizes to exactly 0. That state is stored as the dedicated code value ``ZERO_CODE = −1`` in the
integer code tensor (codes are ``int32``; valid codes are 0 … 2^b − 1). A log code therefore needs
b bits plus one zero flag in hardware, which is what FQ-ViT's mask after the clamp amounts to.
Choosing −1 (rather than 2^b) keeps the helpers below (matmuls, reparameterization) independent
of b.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .base import (MIN_SCALE, Quantizer, check_bool, check_float, check_int, check_percentiles,
                   chunk_step, single_threaded)
from .observers import quantiles
from .registry import register_quantizer
from .stats import BatchPool, check_round_robin, to_cpu, to_device

ZERO_CODE = -1
CODE_DTYPE = torch.int32



def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def finish_log_codes(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Turn rounded real-valued log codes into int32 codes: ≥ 2^b, +inf (input 0) and NaN (negative
    input) become ``ZERO_CODE``; negative codes (input above Δ) clamp to 0."""
    zero = ~(c < 2 ** bits)
    c = torch.where(zero, torch.full_like(c, ZERO_CODE), c.clamp(min=0))
    return c.to(CODE_DTYPE)


def subsample(x: torch.Tensor, max_samples: int) -> torch.Tensor:
    """``x`` flattened to float, strided down to at most ``max_samples`` values (a copy)."""
    flat = x.detach().reshape(-1).float()
    if flat.numel() > max_samples:
        stride = -(-flat.numel() // max_samples)
        flat = flat[::stride]
    return flat.clone()


def merge_max_stats(per_rank, who: str) -> dict:
    """Merge ``{'num_batches', 'max'}`` statistics (the maximum is exact in any order)."""
    total = check_round_robin([s['num_batches'] for s in per_rank], who)
    maxs = [s['max'] for s in per_rank if s['max'] is not None]
    m = None
    for v in maxs:
        m = v.clone() if m is None else torch.maximum(m, v)
    return {'num_batches': total, 'max': m}


def pooled_samples(pool: list, max_samples: int) -> torch.Tensor:
    flat = torch.cat(pool)
    return flat[-max_samples:] if flat.numel() > max_samples else flat


# ---------------------------------------------------------------------------------------------
# log2 / log√2 code formulas (pure functions, broadcast over candidate Δ tensors)
# ---------------------------------------------------------------------------------------------
def log_code_thresholds(code_of, bits: int) -> torch.Tensor:
    """T[k], k = 0 … 2^b − 1: the smallest positive float32 u whose code ``code_of(u)`` (the
    quantizer's own float32 formula, evaluated by torch; non-increasing in u) is ≤ k, found by
    bisection over the float32 bit patterns. ``code_of(u) > k`` exactly when u < T[k]."""
    n = 2 ** bits
    lo = torch.ones(n, dtype=torch.int64)                      # smallest positive subnormal
    hi = torch.full((n,), 0x7F7FFFFF, dtype=torch.int64)       # largest finite float32
    ks = torch.arange(n, dtype=torch.float32)

    def codes(bits_):
        # 64 copies of each value: torch's vectorized kernels, as on the model's tensors
        u = bits_.to(torch.int32).view(torch.float32).repeat_interleave(64)
        return code_of(u).reshape(-1, 64)[:, 0]
    if not bool((codes(hi) <= ks).all()):
        raise ValueError('log code thresholds: the largest input does not reach code 0')
    while bool((hi > lo).any()):
        mid = (lo + hi) // 2
        ok = codes(mid) <= ks                     # NaN codes compare False: keep searching above
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    t = hi.to(torch.int32).view(torch.float32)
    below = (hi - 1).clamp(min=1)
    if not (bool((codes(hi) <= ks).all()) and bool(((codes(below) > ks) | (hi == 1)).all())):
        raise ValueError('log code thresholds: the code is not monotone in its input')
    return t


def log_code_of(mode: int, r: float = 1.0, q: float = 1.0):
    """The float32 log-code formula from u = x/Δ as torch ops (the compiled kernels' modes): mode
    0 log2 ⌊−log2 u⌉, 1 log√2 ⌊−2·log2 u⌉, 2 AdaLog ⌊(−log2 u)·r/q⌉ (r, q as float32)."""
    if mode == 0:
        return lambda u: torch.round(-torch.log2(u))
    if mode == 1:
        return lambda u: torch.round(-2.0 * torch.log2(u))
    if mode == 2:
        return lambda u: torch.round((-torch.log2(u)) * float(r) / float(q))
    raise ValueError(f'log_code_of: mode {mode} is not a log code (0, 1, 2)')


def log2_quantize(x: torch.Tensor, delta, bits: int) -> torch.Tensor:
    """q = clamp(⌊−log2(x/Δ)⌉, 0, 2^b − 1); ``ZERO_CODE`` where the code would be ≥ 2^b."""
    x = _as_float(x)
    return finish_log_codes(torch.round(-torch.log2(x / delta)), bits)


def log2_dequantize(codes: torch.Tensor, delta) -> torch.Tensor:
    """Δ·2^−q, and 0 for ``ZERO_CODE``."""
    valid = codes >= 0
    val = torch.exp2(-codes.clamp(min=0).to(torch.float32)) * delta
    return torch.where(valid, val, torch.zeros_like(val))


def log_sqrt2_quantize(x: torch.Tensor, delta, bits: int) -> torch.Tensor:
    """q = clamp(⌊−2·log2(x/Δ)⌉, 0, 2^b − 1); ``ZERO_CODE`` where the code would be ≥ 2^b."""
    x = _as_float(x)
    return finish_log_codes(torch.round(-2.0 * torch.log2(x / delta)), bits)


def log_sqrt2_dequantize(codes: torch.Tensor, delta) -> torch.Tensor:
    """Δ·2^(−q/2), and 0 for ``ZERO_CODE``."""
    valid = codes >= 0
    val = torch.exp2(-0.5 * codes.clamp(min=0).to(torch.float32)) * delta
    return torch.where(valid, val, torch.zeros_like(val))


def log_sqrt2_fake_quant(x: torch.Tensor, delta, bits: int) -> torch.Tensor:
    return log_sqrt2_dequantize(log_sqrt2_quantize(x, delta, bits), delta)


@torch.no_grad()
@single_threaded
def log_sqrt2_fake_quant_chunked(x: torch.Tensor, delta: torch.Tensor, bits: int):
    """``log_sqrt2_dequantize(log_sqrt2_quantize(x, Δ, b), Δ)`` for float32 x, bit for bit, in
    cache-sized chunks with in-place ops; ``None`` where that does not apply.

    The same float32 ops run in the same order (x/Δ, log2, ·(−2), round, clamp at 0, ·(−1/2),
    exp2, ·Δ). A NaN code (negative or NaN input) is replaced by 2^b, and the zero code (code ≥ 2^b)
    is applied afterwards with a threshold on the value: v(c) = 2^(−c/2)·Δ is strictly decreasing in the integer code c, so c ≥ 2^b exactly when
    v(c) ≤ v(2^b) (checked once on the table of all codes; otherwise ``None``).
    """
    if (not isinstance(delta, torch.Tensor) or delta.numel() != 1 or x.dim() == 0
            or x.numel() == 0 or x.dtype != torch.float32 or delta.dtype != torch.float32
            or not math.isfinite(float(delta))):
        return None
    d = delta.reshape(())
    table = torch.exp2(-0.5 * torch.arange(2 ** bits + 1, dtype=torch.float32,
                                           device=x.device)) * d
    v_zero = table[-1]
    if not bool((table[:-1] > v_zero).all()):
        return None
    v_zero = float(v_zero)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.is_contiguous():
        xv, ov = x.view(-1), out.view(-1)
        step = chunk_step(1, device=x.device)
    else:
        xv, ov = x, out
        step = chunk_step(x[0].numel(), device=x.device)
    for i in range(0, xv.shape[0], step):
        o = ov[i:i + step]
        torch.div(xv[i:i + step], d, out=o)
        o.log2_().mul_(-2.0).round_()
        # NaN codes (negative or NaN inputs) are zero codes: send them to 2^b like the threshold
        torch.nan_to_num_(o, nan=2.0 ** bits, posinf=float('inf'), neginf=float('-inf'))
        o.clamp_(min=0).mul_(-0.5).exp2_().mul_(d)
        F.threshold_(o, v_zero, 0.0)
    return out


def log_sqrt2_to_log2(codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact reparameterization of log√2 codes into log2 shifts with a parity scale.

    shift = ⌈q/2⌉, parity = q mod 2, so that Δ·2^(−q/2) = Δ·2^−shift·(√2 if parity else 1).
    ``ZERO_CODE`` entries keep shift = ``ZERO_CODE`` and parity 0.
    """
    valid = codes >= 0
    shift = torch.where(valid, torch.div(codes + 1, 2, rounding_mode='floor'),
                        torch.full_like(codes, ZERO_CODE))
    parity = torch.where(valid, torch.remainder(codes, 2), torch.zeros_like(codes))
    return shift, parity


# ---------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------
@register_quantizer()
class Log2Quantizer(Quantizer):
    """FQ-ViT log2 quantizer for non-negative inputs (post-softmax).

    Args:
        bits: code bit-width (codes 0 … 2^b − 1, plus ``ZERO_CODE``).
        delta: fixed Δ (default 1.0, the softmax upper bound; ``finalize`` keeps it). ``None``:
            ``finalize`` sets Δ to the smallest power of two ≥ the observed maximum (1 if the
            maximum is ≤ 0), so Δ itself stays a shift.
    """

    PARAMS = ('delta',)

    def __init__(self, bits: int = 4, delta: Optional[float] = 1.0):
        super().__init__(bits)
        if delta is not None:
            check_float(self, 'delta', delta, 0.0, None, lo_open=True)
        self.fixed_delta = delta is not None
        self.register_buffer('delta', torch.tensor(float(delta) if delta is not None else 1.0))
        self.reset_stats()

    def observe(self, x):
        m = x.detach().max().float()
        self._max = m if self._max is None else torch.maximum(self._max, m)
        self._num_batches += 1

    def reset_stats(self):
        self._max = None
        self._num_batches = 0

    @property
    def num_observed(self) -> int:
        return self._num_batches

    def calibration_stats(self):
        """``{'num_batches', 'max': the running maximum (None before data)}``."""
        return {'num_batches': self._num_batches, 'max': to_cpu(self._max)}

    def load_calibration_stats(self, stats):
        self._num_batches = int(stats['num_batches'])
        self._max = to_device(stats['max'], self.device)

    def merge_calibration_stats(self, per_rank):
        return merge_max_stats(per_rank, self.qname)

    def finalize(self):
        if not self.fixed_delta:
            if self._num_batches == 0:
                raise RuntimeError(f'{self.qname}: no calibration data was observed')
            m = float(self._max)
            self.delta.fill_(2.0 ** math.ceil(math.log2(m)) if m > 0 else 1.0)
        self.mark_calibrated()

    def set_params(self, delta=None):
        """Set Δ (clamped to ``MIN_SCALE``)."""
        if delta is not None:
            delta = torch.as_tensor(delta, dtype=torch.float32).detach().clamp(min=MIN_SCALE)
        self._assign_params({'delta': delta})

    def quantize(self, x):
        return log2_quantize(x, self.delta, self.bits)

    def dequantize(self, codes):
        return log2_dequantize(codes, self.delta)

    def extra_repr(self):
        return f'bits={self.bits}, delta={float(self.delta):g}, mode={self.mode}'


@register_quantizer()
class LogSqrt2Quantizer(Quantizer):
    """RepQ-ViT log√2 quantizer for post-softmax probabilities.

    Δ is chosen at ``finalize`` from the pooled calibration samples: candidates are the p-quantiles
    (as ``torch.quantile``) for p in ``percentiles`` (RepQ-ViT's candidates), plus the maximum
    when ``max_candidate`` (our option, off by default), each capped at ``max_delta`` (1 for
    softmax inputs, which their quantiles never exceed); the candidate with the least MSE wins
    (ties → the earlier candidate). ``search=False`` uses the capped maximum. Pooled samples are
    capped at ``max_samples`` (strided subsample of large batches, oldest batches dropped first).
    """

    PARAMS = ('delta',)

    def __init__(self, bits: int = 4, search: bool = True,
                 percentiles: Sequence[float] = (0.999, 0.9999, 0.99999),
                 max_delta: Optional[float] = 1.0, max_samples: int = 2 ** 20,
                 max_candidate: bool = False):
        super().__init__(bits)
        self.search = check_bool(self, 'search', search)
        self.max_candidate = check_bool(self, 'max_candidate', max_candidate)
        self.percentiles = check_percentiles(self, percentiles)
        if max_delta is not None:
            check_float(self, 'max_delta', max_delta, 0.0, None, lo_open=True)
        self.max_delta = max_delta
        self.max_samples = check_int(self, 'max_samples', max_samples, 1)
        self.register_buffer('delta', torch.tensor(1.0))
        self._pool = BatchPool(self.max_samples)
        self.reset_stats()

    def observe(self, x):
        m = x.detach().max().float()
        self._max = m if self._max is None else torch.maximum(self._max, m)
        self._pool.append(subsample(x, self.max_samples) if self.search
                          else x.new_zeros(0, dtype=torch.float32))

    def reset_stats(self):
        self._max = None
        self._pool.reset()

    @property
    def num_observed(self) -> int:
        return self._pool.num_batches

    def calibration_stats(self):
        """``{'num_batches', 'max', 'pool': the kept per-batch samples, oldest first}``."""
        return {**self._pool.stats(), 'max': to_cpu(self._max)}

    def load_calibration_stats(self, stats):
        self._pool.load(stats, self.device)
        self._max = to_device(stats['max'], self.device)

    def merge_calibration_stats(self, per_rank):
        merged = self._pool.merge(per_rank, self.qname)
        merged['max'] = merge_max_stats(per_rank, self.qname)['max']
        return merged

    def _cap(self, d: float) -> float:
        if self.max_delta is not None:
            d = min(d, float(self.max_delta))
        return max(d, MIN_SCALE)

    def delta_candidates(self, flat: torch.Tensor):
        cands = [self._cap(float(v)) for v in quantiles(flat, self.percentiles)]
        if self.max_candidate:
            cands.append(self._cap(float(flat.max())))
        return cands

    def finalize(self):
        if self._pool.num_batches == 0:
            raise RuntimeError(f'{self.qname}: no calibration data was observed')
        if not self.search:
            self.delta.fill_(self._cap(float(self._max)))
        else:
            if not self._pool.items:
                raise RuntimeError(f'{self.qname}: the pooled samples were already released by '
                                   'finalize(); observe again')
            flat = pooled_samples(self._pool.items, self.max_samples)
            cands = self.delta_candidates(flat)
            deltas = torch.tensor(cands, dtype=torch.float32, device=flat.device).unsqueeze(1)
            err = ((log_sqrt2_fake_quant(flat.unsqueeze(0), deltas, self.bits) - flat) ** 2).mean(1)
            self.delta.fill_(cands[int(torch.argmin(err))])
            self._pool.items = []
        self.mark_calibrated()

    def set_params(self, delta=None):
        """Set Δ (clamped to ``MIN_SCALE``)."""
        if delta is not None:
            delta = torch.as_tensor(delta, dtype=torch.float32).detach().clamp(min=MIN_SCALE)
        self._assign_params({'delta': delta})

    def quantize(self, x):
        return log_sqrt2_quantize(x, self.delta, self.bits)

    def dequantize(self, codes):
        return log_sqrt2_dequantize(codes, self.delta)

    def fake_quant(self, x):
        out = log_sqrt2_fake_quant_chunked(x, self.delta, self.bits)
        return out if out is not None else self.dequantize(self.quantize(x)).to(x.dtype)

    def to_log2(self, codes):
        """(shift, parity) codes of the log2 reparameterization; see ``log_sqrt2_to_log2``."""
        return log_sqrt2_to_log2(codes)

    def extra_repr(self):
        return (f'bits={self.bits}, delta={float(self.delta):g}, search={self.search}, '
                f'mode={self.mode}')

