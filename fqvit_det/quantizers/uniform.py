"""Uniform affine quantizer (FQ-ViT §3 / PTQ4ViT / RepQ-ViT base quantizer).

x_q = clamp(round(x / Δ) + z, q_min, q_max),  x̂ = (x_q − z) · Δ

* asymmetric: Δ = (max − min) / (q_max − q_min), z = clamp(q_min − round(min / Δ), q_min, q_max)
* symmetric:  Δ = max(|min|, |max|) / q_max (signed) or max / q_max (unsigned), z = 0.
  FQ-ViT divides by (q_max − q_min)/2 = 127.5, which clips the largest positive weight by half a
  step; we divide by q_max so the full observed range is representable.

The observed range is widened to include 0 so that zero (padding, masked entries) is exact.
"""
from typing import Optional

import torch

from .base import MIN_SCALE, Quantizer, broadcast_param, round_ste
from .registry import build_observer, register_quantizer


def integer_range(bits: int, signed: bool):
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def scale_zero_point(min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool,
                     signed: bool):
    """Δ and z for a (per-tensor or per-channel) range. Pure function, used by observers' searches."""
    qmin, qmax = integer_range(bits, signed)
    min_val = torch.minimum(min_val, torch.zeros_like(min_val))
    max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        amax = torch.maximum(-min_val, max_val) if signed else max_val
        scale = (amax / qmax).clamp(min=MIN_SCALE)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=MIN_SCALE)
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax)
    return scale, zero_point


def fake_quant_uniform(x, scale, zero_point, qmin, qmax, ch_axis=None):
    s = broadcast_param(scale, x, ch_axis)
    z = broadcast_param(zero_point, x, ch_axis)
    return (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s


@register_quantizer()
class UniformQuantizer(Quantizer):
    """Uniform quantizer whose range comes from an observer (MinMax by default).

    Args:
        bits: bit-width.
        symmetric: symmetric (z = 0) or asymmetric (affine) quantization.
        signed: signed integer codes; defaults to ``symmetric``.
        ch_axis: ``None`` for per-tensor, else the channel axis (per-channel / per-head: for
            attention tensors shaped (B, heads, N, d), ``ch_axis=1`` is per-head).
        observer: observer config (``dict(type='MinMaxObserver')`` etc.).
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 ch_axis: Optional[int] = None, observer=None):
        super().__init__(bits)
        self.symmetric = symmetric
        self.signed = symmetric if signed is None else signed
        self.ch_axis = ch_axis
        self.qmin, self.qmax = integer_range(bits, self.signed)
        self.observer = build_observer(observer or dict(type='MinMaxObserver'), ch_axis=ch_axis)
        self.register_buffer('scale', torch.ones(()))
        self.register_buffer('zero_point', torch.zeros(()))

    def observe(self, x):
        self.observer.update(x)

    def params_for_range(self, min_val, max_val):
        return scale_zero_point(min_val, max_val, self.bits, self.symmetric, self.signed)

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
        self.scale = scale.detach().clone()
        self.zero_point = zp.detach().clone()
        self.mark_calibrated()

    def set_params(self, scale, zero_point):
        """Set Δ and z directly (used by searches and reparameterizations)."""
        scale = torch.as_tensor(scale, dtype=torch.float32)
        self.scale = scale.clamp(min=MIN_SCALE).detach().clone()
        self.zero_point = torch.as_tensor(zero_point, dtype=torch.float32).expand_as(scale).clone()
        self.mark_calibrated()

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
        return (f'bits={self.bits}, symmetric={self.symmetric}, signed={self.signed}, {gran}, '
                f'mode={self.mode}')
