"""PTQ4ViT twin uniform quantizers (post-softmax and post-GELU).

A b-bit twin uniform code spends one bit on a region flag (the MSB) and b − 1 bits on a magnitude.
Each region is a uniform grid with its own step; the two steps differ by a power of two, so an
integer kernel can align both regions with a shift.

Post-softmax (inputs in [0, 1]), n = 2^(b−1) − 1:

* R2 (large range, flag 1): Δ_R2 = 1 / n, magnitudes 0..n cover [0, 1].
* R1 (small range, flag 0): Δ_R1 = s / n with split s = 2^−i, i ∈ {0, …, 19}, so Δ_R2 / Δ_R1 = 2^i.
* A value uses exactly ONE region: R1 if x < s, else R2 (PTQ4ViT paper, Eq. 4).

  The official PTQ4ViT forward instead adds the reconstructions of both regions (each clamped to its
  own range) for every value, so a value ≥ s comes out about s too high and its search drifts to tiny
  splits. We implement the paper's quantizer and so fix that behaviour.

Post-GELU (inputs ≥ GELU's minimum −0.16997124), h = 2^(b−1):

* negative region (flag 0): Δ_neg = 0.16997124 / h, levels −1·Δ_neg … −h·Δ_neg (the most negative
  level is GELU's minimum). Since zero is representable in the positive region, the stored magnitude
  is (level − 1): codes 0..h−1 ↔ −Δ_neg … −h·Δ_neg. Together with the positive region this uses all
  2^b codes exactly once (the same 2^b values as the official code's clamp to [−h, 0] / [0, h − 1]).
* positive region (flag 1): Δ_pos = 2^m · Δ_neg with an integer m ∈ [−5, 24] (the paper's power-of-two
  constraint, which the official code does not enforce; AdaLog's re-implementation does), magnitudes
  0..h−1.

Calibration without an external search: ``observe`` pools a bounded random subsample of the calibration
values and ``finalize`` picks the exponent (i or m) with the least MSE on the pool (ties → the first
candidate in the list). The Hessian-guided PTQ4ViT search can instead be run from outside with
``candidate_exps`` / ``fake_quant_with`` and then fixed with ``set_params``.
"""
from typing import List, Sequence

import torch

from .base import (Quantizer, check_finite, check_int, flat_chunks, needs_autograd, round_ste,
                   scratch, single_threaded)
from .registry import register_quantizer
from .stats import PooledStatsMixin, ThinnedPool

# |min_x GELU(x)| (the minimum is at x ≈ −0.7518); PTQ4ViT's negative-region constant.
GELU_NEG_RANGE = 0.16997124
SOFTMAX_SPLIT_EXPS = tuple(range(0, 20))      # s = 2^−i
GELU_POS_EXPS = tuple(range(-5, 25))          # Δ_pos = 2^m Δ_neg


def _as_exp(exp, x: torch.Tensor) -> torch.Tensor:
    """Exponent(s) as a float tensor on ``x``'s device (a tensor of exponents broadcasts against x)."""
    return torch.as_tensor(exp, device=x.device).to(torch.float32)


# --- post-softmax -------------------------------------------------------------------------------
def twin_softmax_steps(split_exp, bits: int, device=None):
    """(s, Δ_R1, Δ_R2) for split 2^−split_exp (float32 tensors; exact powers of two divided by n)."""
    n = 2 ** (bits - 1) - 1
    e = torch.as_tensor(split_exp, device=device).to(torch.float32)
    s = torch.exp2(-e)
    return s, s / n, torch.full_like(s, 1.0 / n)


def twin_softmax_codes(x: torch.Tensor, split_exp, bits: int) -> torch.Tensor:
    """Integer codes: MSB = region flag (1 = large interval R2), low b − 1 bits = magnitude."""
    n = 2 ** (bits - 1) - 1
    xf = x.float()
    s, d1, d2 = twin_softmax_steps(_as_exp(split_exp, xf), bits, xf.device)
    large = xf >= s
    mag = torch.where(large, torch.clamp(torch.round(xf / d2), 0, n),
                      torch.clamp(torch.round(xf / d1), 0, n))
    return mag.to(torch.int32) + large.to(torch.int32) * (n + 1)


def twin_softmax_decode(codes: torch.Tensor, split_exp, bits: int) -> torch.Tensor:
    n = 2 ** (bits - 1) - 1
    codes = codes.to(torch.int64)
    _, d1, d2 = twin_softmax_steps(split_exp, bits, codes.device)
    large = (codes >> (bits - 1)) & 1
    mag = (codes & n).to(torch.float32)
    return torch.where(large.bool(), mag * d2, mag * d1)


def twin_softmax_fake_quant(x: torch.Tensor, split_exp, bits: int) -> torch.Tensor:
    """``decode(codes(x))`` with a straight-through gradient. ``split_exp`` may be a tensor of
    candidates shaped to broadcast against ``x`` (e.g. ``[K, 1, 1, 1]``) for batched searches."""
    n = 2 ** (bits - 1) - 1
    xf = x.float()
    s, d1, d2 = twin_softmax_steps(_as_exp(split_exp, xf), bits, xf.device)
    large = xf >= s
    small_val = torch.clamp(round_ste(xf / d1), 0, n) * d1
    large_val = torch.clamp(round_ste(xf / d2), 0, n) * d2
    return torch.where(large, large_val, small_val).to(x.dtype)


# --- post-GELU ----------------------------------------------------------------------------------
def twin_gelu_steps(m, bits: int, device=None):
    """(Δ_neg, Δ_pos = 2^m Δ_neg) as float32 tensors."""
    h = 2 ** (bits - 1)
    e = torch.as_tensor(m, device=device).to(torch.float32)
    d_neg = torch.full_like(e, GELU_NEG_RANGE / h)
    return d_neg, d_neg * torch.exp2(e)


def twin_gelu_levels(x: torch.Tensor, d_neg, d_pos, h):
    """(negative, positive) levels of x on the post-GELU twin grid, as floats: clamp(⌊x/Δ_neg⌉,
    −h, 0) where x < 0 and clamp(⌊x/Δ_pos⌉, 0, h − 1) elsewhere, 0 in the other region — the two
    operands of an integer GEMM on twin-uniform inputs."""
    zero = torch.zeros_like(x)
    neg = torch.where(x < 0, torch.clamp(torch.round(x / d_neg), -h, 0), zero)
    pos = torch.where(x < 0, zero, torch.clamp(torch.round(x / d_pos), 0, h - 1))
    return neg, pos


def twin_gelu_codes(x: torch.Tensor, m, bits: int) -> torch.Tensor:
    """Integer codes: MSB = 1 for the positive region (magnitude in the low b − 1 bits); MSB = 0 for
    negative levels, storing (|level| − 1) so that −Δ_neg … −2^(b−1)·Δ_neg use codes 0 … 2^(b−1) − 1."""
    h = 2 ** (bits - 1)
    xf = x.float()
    d_neg, d_pos = twin_gelu_steps(_as_exp(m, xf), bits, xf.device)
    neg_level = torch.clamp(torch.round(xf / d_neg), -h, 0)
    pos_level = torch.clamp(torch.round(xf / d_pos), 0, h - 1)
    is_neg = (xf < 0) & (neg_level < 0)
    code = torch.where(is_neg, -neg_level - 1, pos_level + h)
    return code.to(torch.int32)


def twin_gelu_decode(codes: torch.Tensor, m, bits: int) -> torch.Tensor:
    h = 2 ** (bits - 1)
    codes = codes.to(torch.int64)
    d_neg, d_pos = twin_gelu_steps(m, bits, codes.device)
    positive = codes >= h
    pos_val = (codes - h).to(torch.float32) * d_pos
    neg_val = -(codes + 1).to(torch.float32) * d_neg
    return torch.where(positive, pos_val, neg_val)


def twin_gelu_fake_quant(x: torch.Tensor, m, bits: int) -> torch.Tensor:
    """``decode(codes(x))`` with a straight-through gradient; ``m`` may be a broadcastable tensor."""
    h = 2 ** (bits - 1)
    xf = x.float()
    d_neg, d_pos = twin_gelu_steps(_as_exp(m, xf), bits, xf.device)
    neg_val = torch.clamp(round_ste(xf / d_neg), -h, 0) * d_neg
    pos_val = torch.clamp(round_ste(xf / d_pos), 0, h - 1) * d_pos
    return torch.where(xf < 0, neg_val, pos_val).to(x.dtype)


# --- fast no-grad paths ------------------------------------------------------------------------
@torch.no_grad()
@single_threaded
def _twin_fake_quant_chunked(x: torch.Tensor, pick_small, d_small, d_large, lo: float, hi: float):
    """clamp(⌊x/Δ⌉, lo, hi)·Δ with Δ = d_small where ``pick_small(x)`` else d_large, in
    cache-resident row chunks. Each value is divided and multiplied by exactly the step the
    reference uses, so the result is bit-identical to it (a final − 0·x gives the reference's +0.0
    for rounded tiny negatives and NaN for ±inf). ``None`` when it does not apply."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() == 0:
        return None
    out = torch.empty_like(x)
    for xc, o in flat_chunks(x, out):
        mask = scratch('twin_mask', xc.shape, torch.bool, x.device)
        step = scratch('twin_step', xc.shape, torch.float32, x.device)
        pick_small(xc, out=mask)
        torch.where(mask, d_small, d_large, out=step)
        torch.div(xc, step, out=o)
        o.round_().clamp_(lo, hi).mul_(step)
        o.sub_(xc, alpha=0.0)
    return out


def twin_softmax_fake_quant_fast(x: torch.Tensor, split_exp, bits: int) -> torch.Tensor:
    """``twin_softmax_fake_quant`` for one split (no autograd): bit-identical, chunked on CPU.
    R1 needs no upper clamp (x < s = n·Δ_R1 rounds to at most n), so one clamp(0, n) serves both."""
    if needs_autograd(x) or torch.as_tensor(split_exp).numel() != 1:
        return twin_softmax_fake_quant(x, split_exp, bits)
    n = 2 ** (bits - 1) - 1
    s, d1, d2 = twin_softmax_steps(_as_exp(split_exp, x), bits, x.device)
    out = _twin_fake_quant_chunked(x, lambda t, out: torch.lt(t, s.reshape(()), out=out),
                                   d1.reshape(()), d2.reshape(()), 0.0, float(n))
    return out if out is not None else twin_softmax_fake_quant(x, split_exp, bits)


def twin_gelu_fake_quant_fast(x: torch.Tensor, m, bits: int) -> torch.Tensor:
    """``twin_gelu_fake_quant`` for one m (no autograd): bit-identical, chunked on CPU. A negative
    x rounds to ≤ 0 and a non-negative one to ≥ 0, so one clamp(−h, h − 1) serves both regions."""
    if needs_autograd(x) or torch.as_tensor(m).numel() != 1:
        return twin_gelu_fake_quant(x, m, bits)
    h = 2 ** (bits - 1)
    d_neg, d_pos = twin_gelu_steps(_as_exp(m, x), bits, x.device)
    out = _twin_fake_quant_chunked(x, lambda t, out: torch.lt(t, 0.0, out=out),
                                   d_neg.reshape(()), d_pos.reshape(()), float(-h), float(h - 1))
    return out if out is not None else twin_gelu_fake_quant(x, m, bits)


# --- quantizers ---------------------------------------------------------------------------------
class _TwinUniformQuantizer(PooledStatsMixin, Quantizer):
    """Shared calibration: a bounded, deterministic random subsample of the observed values.

    A batch of more than ``max_samples`` values contributes ``max_samples`` of them drawn
    uniformly (with replacement) from a generator seeded by ``seed`` and the batch's size; all
    batches' samples are then thinned by the same power of two (``ThinnedPool``) so the pool holds
    at most ``max_samples`` values and every batch keeps equal weight per value. The pool depends
    only on the set of batches, which makes the statistics of several ranks merge exactly.
    """

    EXP_NAME = 'exp'
    CANDIDATES: Sequence[int] = ()

    def __init__(self, bits: int = 8, max_samples: int = 2 ** 20, seed: int = 0):
        super().__init__(bits)
        self.max_samples = check_int(self, 'max_samples', max_samples, 1)
        self.seed = check_int(self, 'seed', seed, 0)
        self._pool = ThinnedPool(self.max_samples)

    @property
    def PARAMS(self):
        return (self.EXP_NAME,)

    def observe(self, x: torch.Tensor) -> None:
        check_finite(x, self.qname)
        flat = x.detach().reshape(-1).float()
        if flat.numel() > self.max_samples:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + flat.numel())
            idx = torch.randint(flat.numel(), (self.max_samples,), generator=gen).to(flat.device)
            flat = flat[idx]
        self._pool.append(flat.clone())

    def pooled_samples(self) -> torch.Tensor:
        if self._pool.num_batches == 0:
            raise RuntimeError(f'{self.qname}: no calibration data was observed')
        if not self._pool.items:
            raise RuntimeError(f'{self.qname}: the pooled samples were already released by '
                               'finalize(); observe again')
        return torch.cat(self._pool.items)

    def candidate_exps(self) -> List[int]:
        return list(self.CANDIDATES)

    def fake_quant_with(self, x: torch.Tensor, exp) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def candidate_mse(self, samples: torch.Tensor) -> torch.Tensor:
        """MSE of each candidate exponent on ``samples`` (float64, shape [num_candidates])."""
        errs = []
        for e in self.CANDIDATES:
            err = (self.fake_quant_with(samples, e) - samples).double().pow(2).mean()
            errs.append(err)
        return torch.stack(errs)

    def finalize(self) -> None:
        samples = self.pooled_samples()
        errs = self.candidate_mse(samples)
        best = int(torch.argmin(errs))       # first minimum on ties
        self._set_exp(self.CANDIDATES[best])
        self._pool.items = []

    def _set_exp(self, value) -> None:
        v = torch.as_tensor(value).detach()
        if v.numel() != 1 or (v.is_floating_point() and float(v) != round(float(v))) \
                or int(v) not in self.CANDIDATES:
            raise ValueError(f'{self.qname}: {self.EXP_NAME} must be an integer in '
                             f'[{self.CANDIDATES[0]}, {self.CANDIDATES[-1]}], got {value}')
        self._assign_params({self.EXP_NAME: torch.tensor(int(v), dtype=torch.int64)})


@register_quantizer()
class TwinUniformSoftmaxQuantizer(_TwinUniformQuantizer):
    """PTQ4ViT twin uniform quantizer for post-softmax attention probabilities (inputs in [0, 1]).

    Buffer ``split_exp`` = i, split s = 2^−i. Values below 0 clamp to 0 and above 1 to 1.
    """

    EXP_NAME = 'split_exp'
    CANDIDATES = SOFTMAX_SPLIT_EXPS

    def __init__(self, bits: int = 8, max_samples: int = 2 ** 20, seed: int = 0):
        super().__init__(bits, max_samples, seed)
        # Uncalibrated default: 2^−7 ≈ 0.0078, near the paper's initial split 0.01.
        self.register_buffer('split_exp', torch.tensor(7, dtype=torch.int64))

    def set_params(self, split_exp=None) -> None:
        """Set the split exponent i (s = 2^−i)."""
        if split_exp is not None:
            self._set_exp(split_exp)

    def fake_quant_with(self, x, exp):
        return twin_softmax_fake_quant(x, exp, self.bits)

    def quantize(self, x):
        return twin_softmax_codes(x, self.split_exp, self.bits)

    def dequantize(self, codes):
        return twin_softmax_decode(codes, self.split_exp, self.bits)

    def fake_quant(self, x):
        return twin_softmax_fake_quant_fast(x, self.split_exp, self.bits)

    def extra_repr(self):
        return f'bits={self.bits}, split=2^-{int(self.split_exp)}, mode={self.mode}'


@register_quantizer()
class TwinUniformGeluQuantizer(_TwinUniformQuantizer):
    """PTQ4ViT twin uniform quantizer for post-GELU activations.

    Buffer ``pos_exp`` = m, Δ_pos = 2^m · Δ_neg, Δ_neg = 0.16997124 / 2^(b−1). ``set_params(pos_exp=...)``.
    """

    EXP_NAME = 'pos_exp'
    CANDIDATES = GELU_POS_EXPS

    def __init__(self, bits: int = 8, max_samples: int = 2 ** 20, seed: int = 0):
        super().__init__(bits, max_samples, seed)
        self.register_buffer('pos_exp', torch.tensor(0, dtype=torch.int64))

    @property
    def m(self) -> int:
        return int(self.pos_exp)

    def set_params(self, pos_exp=None, m=None) -> None:
        """Set m (Δ_pos = 2^m·Δ_neg), as ``pos_exp`` (its buffer name) or ``m``."""
        if pos_exp is not None and m is not None:
            raise ValueError(f'{self.qname}: give pos_exp or m, not both')
        value = pos_exp if pos_exp is not None else m
        if value is not None:
            self._set_exp(value)

    def fake_quant_with(self, x, exp):
        return twin_gelu_fake_quant(x, exp, self.bits)

    def candidate_mse(self, samples):
        # The negative region does not depend on m: score on the positive values only.
        pos = samples[samples >= 0]
        if pos.numel() == 0:
            return torch.zeros(len(self.CANDIDATES), dtype=torch.float64)
        return super().candidate_mse(pos)

    def quantize(self, x):
        return twin_gelu_codes(x, self.pos_exp, self.bits)

    def dequantize(self, codes):
        return twin_gelu_decode(codes, self.pos_exp, self.bits)

    def fake_quant(self, x):
        return twin_gelu_fake_quant_fast(x, self.pos_exp, self.bits)

    def extra_repr(self):
        return f'bits={self.bits}, m={int(self.pos_exp)}, mode={self.mode}'
