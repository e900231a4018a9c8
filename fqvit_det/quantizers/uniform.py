"""Uniform affine quantizer (FQ-ViT §3 / PTQ4ViT / RepQ-ViT base quantizer).

x_q = clamp(round(x / Δ) + z, q_min, q_max),  x̂ = (x_q − z) · Δ

* asymmetric: Δ = (max − min) / (q_max − q_min), z = clamp(q_min − round(min / Δ), q_min, q_max)
* symmetric:  Δ = max(|min|, |max|) / q_max (signed) or max / q_max (unsigned), z = 0.
  FQ-ViT divides by (q_max − q_min)/2 = 127.5, which clips the largest positive weight by half a
  step (option ``symmetric_divisor='half_range'``); by default we divide by q_max so the full
  observed range is representable.

By default the observed range is widened to include 0 so that zero (padding, masked entries) is
exact, and z is clamped to the code range. FQ-ViT keeps the observed range (``include_zero=False``)
and clamps z; RepQ-ViT keeps the observed range and does not clamp z (``clamp_zero_point=False``).
"""
import math
from typing import Optional

import torch

from .base import (MIN_SCALE, Quantizer, broadcast_param, check_bool, check_ch_axis, chunk_step,
                   is_integral, needs_autograd, round_ste, single_threaded)
from .registry import OBSERVERS, build_observer, register_quantizer


def integer_range(bits: int, signed: bool):
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def check_observer_cfg(owner, observer, default: str = 'MinMaxObserver') -> dict:
    """An observer config: ``None`` (the default), a registered name or a dict with ``type``."""
    who = type(owner).__name__
    if observer is None:
        return dict(type=default)
    if isinstance(observer, str):
        observer = dict(type=observer)
    if not isinstance(observer, dict):
        raise TypeError(f'{who}: observer must be a registered observer name or a dict with a '
                        f'"type" key, got {observer!r} ({type(observer).__name__})')
    if observer.get('type') not in OBSERVERS:
        raise ValueError(f'{who}: observer type {observer.get("type")!r} is not registered; '
                         f'expected one of {sorted(OBSERVERS)}')
    if 'ch_axis' in observer:
        raise ValueError(f'{who}: observer.ch_axis is set by the quantizer (its ch_axis); remove it')
    return observer


SYMMETRIC_DIVISORS = ('qmax', 'half_range')


def scale_zero_point(min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool,
                     signed: bool, include_zero: bool = True, clamp_zero_point: bool = True,
                     symmetric_divisor: str = 'qmax'):
    """Δ and z for a (per-tensor or per-channel) range. Pure function, used by observers' searches.

    ``include_zero`` widens [min, max] to contain 0 (so 0 is exact; FQ-ViT and RepQ-ViT do not);
    ``clamp_zero_point`` clamps z to [q_min, q_max] (FQ-ViT does, RepQ-ViT does not: a one-sided
    range then has z outside the code range). ``symmetric_divisor``: Δ = amax / q_max
    (``'qmax'``) or amax / ((q_max − q_min)/2) (``'half_range'``, FQ-ViT's 127.5 at 8 bits).
    """
    qmin, qmax = integer_range(bits, signed)
    if include_zero:
        min_val = torch.minimum(min_val, torch.zeros_like(min_val))
        max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        amax = torch.maximum(-min_val, max_val) if signed else max_val
        divisor = qmax if symmetric_divisor == 'qmax' else (qmax - qmin) / 2
        scale = (amax / divisor).clamp(min=MIN_SCALE)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=MIN_SCALE)
        zero_point = qmin - torch.round(min_val / scale)
        if clamp_zero_point:
            zero_point = zero_point.clamp(qmin, qmax)
    return scale, zero_point


def fake_quant_uniform_reference(x, scale, zero_point, qmin, qmax, ch_axis=None):
    """(clamp(⌊x/Δ⌉ + z, q_min, q_max) − z)·Δ with a straight-through rounding gradient."""
    s = broadcast_param(scale, x, ch_axis)
    z = broadcast_param(zero_point, x, ch_axis)
    return (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s


def fake_quant_uniform(x, scale, zero_point, qmin, qmax, ch_axis=None):
    """Uniform fake quantization (see ``fake_quant_uniform_reference``).

    Without autograd this runs ``fake_quant_chunked``, which returns bit-identical values far
    faster on large CPU tensors; with autograd it keeps the straight-through-estimator graph.
    """
    if not needs_autograd(x, scale, zero_point):
        out = fake_quant_chunked(x, scale, zero_point, qmin, qmax, ch_axis)
        if out is not None:
            return out
    return fake_quant_uniform_reference(x, scale, zero_point, qmin, qmax, ch_axis)


@torch.no_grad()
@single_threaded
def fake_quant_chunked(x, scale, zero_point, qmin, qmax, ch_axis=None):
    """No-grad fake quantization, bit-identical to ``fake_quant_uniform_reference``.

    Runs in row chunks (cache-resident) with in-place ops, without autograd (the caller keeps
    the straight-through-estimator reference for that). With an integral zero point z (the
    usual case) it uses clamp(⌊x/Δ⌉ + z, q_min, q_max) − z = clamp(⌊x/Δ⌉, q_min − z, q_max − z)
    (exact: integers below 2^24 in float32), then ·Δ. A final − 0·x reproduces the reference's
    special values: +0.0 where rounding a tiny negative input gave −0.0, NaN for ±inf inputs.
    Returns ``None`` where the shortcut does not apply (mixed dtypes, a non-positive scale,
    broadcasting that changes the shape); the caller then uses the reference.
    """
    if not (isinstance(scale, torch.Tensor) and isinstance(zero_point, torch.Tensor)):
        return None
    if x.dim() == 0 or not x.is_floating_point() or not (x.dtype == scale.dtype == zero_point.dtype):
        return None
    s = broadcast_param(scale, x, ch_axis)
    z = broadcast_param(zero_point, x, ch_axis)
    if torch.broadcast_shapes(x.shape, s.shape, z.shape) != x.shape or x.numel() == 0:
        return None
    if not bool((s > 0).all()):
        return None
    if ch_axis is None and (s.numel() != 1 or z.numel() != 1):
        return None
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if s.numel() == 1 and z.numel() == 1:
        sv, zv = s.reshape(()), z.reshape(())
        if x.is_contiguous():
            xv, ov = x.view(-1, 1), out.view(-1, 1)
            step = chunk_step(1, device=x.device)
        else:                                 # strided views (q, k, v): chunk the first dim
            xv, ov = x, out
            step = chunk_step(x[0].numel(), device=x.device)
    else:
        axis = ch_axis % x.dim()
        P = int(math.prod(x.shape[:axis]))
        C = x.shape[axis]
        xv, ov = x.reshape(P, C, -1), out.view(P, C, -1)
        # broadcasting kept x's shape, so each parameter has 1 or C entries
        sv = s.reshape(()) if s.numel() == 1 else s.reshape(1, C, 1)
        zv = z.reshape(()) if z.numel() == 1 else z.reshape(1, C, 1)
        step = chunk_step(xv.shape[1] * xv.shape[2], device=x.device)
    integral = is_integral(zv)
    if integral:
        lo, hi = qmin - zv, qmax - zv
        if lo.numel() == 1:
            lo, hi = float(lo), float(hi)
    for i in range(0, xv.shape[0], step):
        o = ov[i:i + step]
        torch.div(xv[i:i + step], sv, out=o)
        o.round_()
        if integral:
            o.clamp_(lo, hi).mul_(sv)
        else:
            o.add_(zv).clamp_(qmin, qmax).sub_(zv).mul_(sv)
        # − 0·x: +0.0 for finite x (turns a −0.0 from rounding a tiny negative input into the
        # reference's +0.0; every other value is unchanged) and NaN for x = ±inf, as the
        # reference's straight-through round gives (inf + (round(inf) − inf) = NaN)
        o.sub_(xv[i:i + step], alpha=0.0)
    return out


@register_quantizer()
class UniformQuantizer(Quantizer):
    """Uniform quantizer whose range comes from an observer (MinMax by default).

    Args:
        bits: bit-width.
        symmetric: symmetric (z = 0) or asymmetric (affine) quantization.
        signed: signed integer codes; defaults to ``symmetric``.
        ch_axis: ``None`` for per-tensor, else the channel axis (per-channel / per-head: for
            attention tensors shaped (B, heads, N, d), ``ch_axis=1`` is per-head).
        observer: observer config (``dict(type='MinMaxObserver')`` etc., or a registered name).
        include_zero: widen the observed range to contain 0 (default; exact zeros for padding
            and masks). FQ-ViT and RepQ-ViT keep the observed range: ``False``.
        clamp_zero_point: clamp z to the code range (default; FQ-ViT). RepQ-ViT: ``False``.
        symmetric_divisor: ``'qmax'`` (Δ = amax/127 at 8 bits, the full range representable;
            default) or ``'half_range'`` (Δ = amax/127.5, FQ-ViT's symmetric quantizers).

    Parameters (``get_params``): ``scale`` and ``zero_point`` (float32, scalar or [C]).
    Calibration statistics: the observer's (see ``observers.py``).
    """

    PARAMS = ('scale', 'zero_point')

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 ch_axis: Optional[int] = None, observer=None, include_zero: bool = True,
                 clamp_zero_point: bool = True, symmetric_divisor: str = 'qmax'):
        super().__init__(bits)
        self.symmetric = check_bool(self, 'symmetric', symmetric)
        self.signed = symmetric if signed is None else check_bool(self, 'signed', signed)
        self.ch_axis = check_ch_axis(self, ch_axis)
        self.include_zero = check_bool(self, 'include_zero', include_zero)
        self.clamp_zero_point = check_bool(self, 'clamp_zero_point', clamp_zero_point)
        if symmetric_divisor not in SYMMETRIC_DIVISORS:
            raise ValueError(f'UniformQuantizer: symmetric_divisor must be one of '
                             f'{SYMMETRIC_DIVISORS}, got {symmetric_divisor!r}')
        self.symmetric_divisor = symmetric_divisor
        self.qmin, self.qmax = integer_range(bits, self.signed)
        self.observer = build_observer(check_observer_cfg(self, observer), ch_axis=ch_axis)
        self.register_buffer('scale', torch.ones(()))
        self.register_buffer('zero_point', torch.zeros(()))

    def observe(self, x):
        self.observer.update(x)

    # --- calibration statistics -----------------------------------------------------------------
    @property
    def num_observed(self) -> int:
        return self.observer.num_batches

    def reset_stats(self):
        self.observer.reset_stats()

    def calibration_stats(self):
        return self.observer.stats()

    def load_calibration_stats(self, stats):
        self.observer.load_stats(stats, self.device)

    def merge_calibration_stats(self, per_rank):
        return self.observer.merge_stats(per_rank)

    # --- parameters -----------------------------------------------------------------------------
    def params_for_range(self, min_val, max_val):
        return scale_zero_point(min_val, max_val, self.bits, self.symmetric, self.signed,
                                self.include_zero, self.clamp_zero_point, self.symmetric_divisor)

    def range_error(self, min_val, max_val, x, ch_axis=None):
        """Per-channel (or scalar) MSE of quantizing ``x`` with the range [min_val, max_val]."""
        scale, zp = self.params_for_range(min_val, max_val)
        err = (fake_quant_uniform(x, scale, zp, self.qmin, self.qmax, ch_axis) - x) ** 2
        if ch_axis is None:
            return err.mean()
        dims = [d for d in range(x.dim()) if d != ch_axis % x.dim()]
        return err.mean(dim=dims)

    def finalize(self):
        min_val, max_val = self.observer.compute_range(self.range_error)
        self.set_range(min_val, max_val)

    def set_range(self, min_val, max_val):
        scale, zp = self.params_for_range(min_val, max_val)
        self.set_params(scale=scale, zero_point=zp)

    def set_params(self, scale=None, zero_point=None):
        """Set Δ (clamped to ``MIN_SCALE``) and / or z (float32; a scalar z broadcasts to Δ's
        shape)."""
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=torch.float32).detach().clamp(min=MIN_SCALE)
        if zero_point is not None:
            zero_point = torch.as_tensor(zero_point, dtype=torch.float32).detach()
            shape = scale.shape if scale is not None else self.scale.shape
            if zero_point.numel() == 1:
                zero_point = zero_point.reshape(()).expand(shape)
        self._assign_params({'scale': scale, 'zero_point': zero_point})

    def quantize(self, x):
        s = broadcast_param(self.scale, x, self.ch_axis)
        z = broadcast_param(self.zero_point, x, self.ch_axis)
        return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, codes):
        s = broadcast_param(self.scale, codes, self.ch_axis)
        z = broadcast_param(self.zero_point, codes, self.ch_axis)
        return (codes.to(s.dtype) - z) * s

    def fake_quant(self, x):
        return fake_quant_uniform(x, self.scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)

    def extra_repr(self):
        gran = 'per-tensor' if self.ch_axis is None else f'ch_axis={self.ch_axis}'
        extra = ''.join([', include_zero=False' if not self.include_zero else '',
                         ', clamp_zero_point=False' if not self.clamp_zero_point else '',
                         ', symmetric_divisor=half_range'
                         if self.symmetric_divisor != 'qmax' else ''])
        return (f'bits={self.bits}, symmetric={self.symmetric}, signed={self.signed}, {gran}'
                f'{extra}, mode={self.mode}')
