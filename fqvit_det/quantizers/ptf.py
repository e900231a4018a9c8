"""FQ-ViT Power-of-Two Factor (PTF) quantizer and integer LayerNorm.

PTF (for LayerNorm inputs, i.e. the residual stream, whose channels differ in range by orders of
magnitude). With K power-of-two factors and b bits:

* global range over all channels [min, max] (widened to contain 0, like ``UniformQuantizer``);
* Δ_b = (max − min) / (2^b − 1), one shared zero point z = clamp(−⌊min / Δ_b⌉, 0, 2^b − 1);
* base scale Δ_1 = Δ_b / 2^K;
* per channel c, α_c ∈ {0..K} minimises the channel's MSE on the last calibration batch with the
  channel scale Δ_c = 2^α_c · Δ_1.

Codes are unsigned: q = clamp(⌊x / Δ_c⌉ + z, 0, 2^b − 1), x̂ = (q − z) · Δ_c. Since every channel
shares z and Δ_1, ``(q − z) · 2^α_c`` expresses all channels in units of Δ_1 (a bit shift), which
is what the integer LayerNorm consumes.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import MIN_SCALE, Quantizer, broadcast_param, round_ste
from .registry import build_observer, register_quantizer
from .uniform import UniformQuantizer


@register_quantizer()
class PTFQuantizer(Quantizer):
    """Power-of-Two-Factor quantizer (FQ-ViT), channel-wise factors along ``ch_axis``.

    Args:
        bits: bit-width of the (unsigned) codes.
        ch_axis: channel axis (the hidden dimension; last axis for (B, N, C) token tensors).
        num_factors: K, the largest power-of-two factor exponent (α ∈ {0..K}).
        observer: observer config; must be per-channel capable (MinMax, EMA, Percentile). It is
            built with ``ch_axis``; the global range is the min/max over its channel ranges.
    """

    def __init__(self, bits: int = 8, ch_axis: int = -1, num_factors: int = 3, observer=None):
        super().__init__(bits)
        if ch_axis is None:
            raise ValueError('PTFQuantizer: ch_axis must be a channel axis, not None')
        if not isinstance(num_factors, int) or num_factors < 0:
            raise ValueError(f'PTFQuantizer: num_factors must be an int >= 0, got {num_factors!r}')
        self.ch_axis = ch_axis
        self.num_factors = num_factors
        self.qmin, self.qmax = 0, 2 ** bits - 1
        self.observer = build_observer(observer or dict(type='MinMaxObserver'), ch_axis=ch_axis)
        self.register_buffer('base_scale', torch.ones(()))
        self.register_buffer('zero_point', torch.zeros(()))
        self.register_buffer('alpha', torch.zeros((), dtype=torch.long))
        # Last calibration batch (for choosing α); a plain attribute, so never in the state_dict.
        self._last = None

    # --- calibration ------------------------------------------------------------------------
    def observe(self, x):
        self.observer.update(x)
        self._last = x.detach().float().clone()

    def channel_error(self, x: torch.Tensor, scale, zero_point) -> torch.Tensor:
        """Per-channel MSE of quantizing ``x`` with a scalar scale and zero point."""
        xq = (torch.clamp(torch.round(x / scale) + zero_point, self.qmin, self.qmax) - zero_point)
        err = (xq * scale - x) ** 2
        axis = self.ch_axis % x.dim()
        return err.mean(dim=[d for d in range(x.dim()) if d != axis])

    def finalize(self):
        if self._last is None:
            raise RuntimeError(f'{self.qname}: PTF needs the last calibration batch to choose its '
                               'power-of-two factors; it is not kept in a saved state, recalibrate')
        min_c, max_c = self.observer.compute_range()
        gmin = torch.clamp(min_c.min(), max=0.0).float()
        gmax = torch.clamp(max_c.max(), min=0.0).float()
        # Δ_b is clamped so that Δ_1 = Δ_b / 2^K never falls below MIN_SCALE (all-zero input).
        scale_b = ((gmax - gmin) / (self.qmax - self.qmin)).clamp(min=MIN_SCALE * 2 ** self.num_factors)
        zero_point = (self.qmin - torch.round(gmin / scale_b)).clamp(self.qmin, self.qmax)
        base = scale_b / 2 ** self.num_factors
        x = self._last
        errs = torch.stack([self.channel_error(x, base * 2 ** a, zero_point)
                            for a in range(self.num_factors + 1)])
        alpha = errs.argmin(dim=0)  # ties -> the smallest factor (finest step)
        self.base_scale = base.detach().clone()
        self.zero_point = zero_point.detach().clone()
        self.alpha = alpha.to(torch.long)
        self._last = None
        self.mark_calibrated()

    # --- quantization -----------------------------------------------------------------------
    @property
    def channel_scale(self) -> torch.Tensor:
        """Δ_c = 2^α_c · Δ_1, shape ``[C]``."""
        return self.base_scale * torch.pow(2.0, self.alpha.to(self.base_scale.dtype))

    def _scale_for(self, x):
        return broadcast_param(self.channel_scale, x, self.ch_axis)

    def quantize(self, x):
        s = self._scale_for(x)
        return torch.clamp(torch.round(x / s) + self.zero_point, self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, codes):
        s = self._scale_for(codes)
        return (codes.to(s.dtype) - self.zero_point) * s

    def fake_quant(self, x):
        s = self._scale_for(x)
        z = self.zero_point
        return ((torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax) - z) * s).to(x.dtype)

    def shifted_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(q − z) · 2^α_c: every channel in units of Δ_1 (integer, int32)."""
        q = self.quantize(x) - self.zero_point.round().to(torch.int32)
        factor = broadcast_param(torch.pow(2, self.alpha).to(torch.int32), q, self.ch_axis)
        return q * factor

    def extra_repr(self):
        return (f'bits={self.bits}, ch_axis={self.ch_axis}, num_factors={self.num_factors}, '
                f'mode={self.mode}')


def int_layernorm(shifted_codes: torch.Tensor, base_scale, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], out_scale, out_zero_point, out_bits: int = 8,
                  eps: float = 1e-5, dyadic_bits: int = 8, fold_mean: bool = True) -> torch.Tensor:
    """FQ-ViT integer LayerNorm over the last dim; returns unsigned output codes (int32).

    Input x_c are integer codes in units of Δ_1 (``PTFQuantizer.shifted_codes``): x = Δ_1 · x_c.
    Derivation (per token, channel c; C channels, S1 = Σ x_c, S2 = Σ x_c²):

        μ = Δ_1 · S1 / C,  σ = Δ_1 / C · sqrt(C·S2 − S1² + eps·C²/Δ_1²) = sqrt(Var + eps)
        LN(x)_c / Δ_out = A_c · x_c + B'_c,  A_c = Δ_1 γ_c / (σ Δ_out),  B'_c = (β_c − μ γ_c / σ) / Δ_out

    i.e. the mean is folded into the bias, and x_c enters un-centred. A_c becomes the dyadic number
    sign(A)·M·2^−N with a ``dyadic_bits``-bit M:  N = clamp(dyadic_bits − 1 − ⌊log2|A|⌋, 0, 31),
    M = clamp(⌊|A|·2^N⌋, 0, 2^dyadic_bits − 1), and B = ⌊B'·2^N⌉, so the integer output is

        y_q = clamp(⌊(sign(A)·M·x_c + B + 2^(N−1)) / 2^N⌋ + z_out, 0, 2^out_bits − 1)

    (the + 2^(N−1) makes the shift round to nearest, matching ⌊·⌉ in the reference).
    ``fold_mean=False`` (our option, not FQ-ViT) centres in integers instead: the multiplier acts on
    C·x_c − S1 (exact, integer) with A_c / C, and B = ⌊β_c/Δ_out · 2^N⌉. With the mean folded into
    B, the dyadic truncation error (< 2^(1−dyadic_bits) relative) scales with |A·x_c|, which is
    large when |μ|/σ is large; at the extreme, a token that is constant over channels (σ² = eps)
    comes out saturated instead of as β. Centred, the error scales with |LN(x) − β|/Δ_out only.

    Differences from the FQ-ViT code, on purpose: it ignores eps, the output zero point and the
    output clamp; here eps is added to the variance, z_out is added and the result is clamped to
    the unsigned ``out_bits`` range. σ is per token, so M, N, B are per token and channel (fine in
    simulation; an integer kernel would compute them on the fly from S1, S2).
    """
    x = shifted_codes.to(torch.int64)
    C = x.shape[-1]
    s1 = x.sum(dim=-1, keepdim=True)
    s2 = (x * x).sum(dim=-1, keepdim=True)
    d = (C * s2 - s1 * s1).to(torch.float64)  # exact integer C²·Var/Δ_1², >= 0
    delta1 = torch.as_tensor(base_scale, dtype=torch.float64, device=x.device)
    delta_out = torch.as_tensor(out_scale, dtype=torch.float64, device=x.device)
    sigma = delta1 / C * torch.sqrt(d + eps * C * C / (delta1 * delta1))
    mu = delta1 * s1.to(torch.float64) / C
    gamma = (torch.ones(C, dtype=torch.float64, device=x.device) if weight is None
             else weight.detach().to(torch.float64))
    beta = (torch.zeros(C, dtype=torch.float64, device=x.device) if bias is None
            else bias.detach().to(torch.float64))

    a = delta1 / sigma * gamma / delta_out
    if not fold_mean:
        a = a / C
    abs_a = a.abs()
    log2a = torch.floor(torch.log2(abs_a.clamp(min=torch.finfo(torch.float64).tiny)))
    n = torch.clamp(dyadic_bits - 1 - log2a, 0, 31).to(torch.int64)
    two_n = torch.bitwise_left_shift(torch.ones_like(n), n)
    m = torch.clamp(torch.floor(abs_a * two_n), 0, 2 ** dyadic_bits - 1).to(torch.int64)
    m = torch.where(a < 0, -m, m)
    if fold_mean:
        b = torch.round((beta - mu / sigma * gamma) / delta_out * two_n).to(torch.int64)
        xin = x
    else:
        b = torch.round(beta / delta_out * two_n).to(torch.int64)
        xin = C * x - s1
    acc = m * xin + b + torch.div(two_n, 2, rounding_mode='floor')
    y = torch.div(acc, two_n, rounding_mode='floor')
    z_out = torch.as_tensor(out_zero_point, device=x.device).round().to(torch.int64)
    return torch.clamp(y + z_out, 0, 2 ** out_bits - 1).to(torch.int32)


class IntLayerNorm(nn.Module):
    """LayerNorm over the last dim run as FQ-ViT's integer LayerNorm once both quantizers are in
    ``'quant'`` mode. Otherwise (float / observe) it runs the float LayerNorm between the two
    quantizers, so one calibration pass calibrates the PTF input and the 8-bit output quantizer.
    ``forward`` returns dequantized output codes, so the module drops into a float graph.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 in_quantizer: Optional[PTFQuantizer] = None,
                 out_quantizer: Optional[UniformQuantizer] = None, dyadic_bits: int = 8,
                 fold_mean: bool = True):
        super().__init__()
        self.normalized_shape = (int(normalized_shape),)
        self.eps = eps
        self.dyadic_bits = dyadic_bits
        self.fold_mean = fold_mean
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape))
        else:
            self.register_parameter('weight', None)
            self.register_parameter('bias', None)
        self.in_quantizer = in_quantizer if in_quantizer is not None else PTFQuantizer(ch_axis=-1)
        self.out_quantizer = (out_quantizer if out_quantizer is not None
                              else UniformQuantizer(bits=8, symmetric=False))
        if self.out_quantizer.ch_axis is not None or self.out_quantizer.signed:
            raise ValueError('IntLayerNorm: the output quantizer must be per-tensor and unsigned')

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, **kwargs) -> 'IntLayerNorm':
        if len(ln.normalized_shape) != 1:
            raise ValueError('IntLayerNorm: only LayerNorm over the last dimension is supported')
        mod = cls(ln.normalized_shape[0], eps=ln.eps,
                  elementwise_affine=ln.weight is not None, **kwargs)
        if ln.weight is not None:
            mod.weight.data.copy_(ln.weight.data)
        if ln.bias is not None and mod.bias is not None:
            mod.bias.data.copy_(ln.bias.data)
        return mod.to(ln.weight.device if ln.weight is not None else 'cpu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        iq, oq = self.in_quantizer, self.out_quantizer
        if iq.mode == 'quant' and oq.mode == 'quant':
            if iq.ch_axis % x.dim() != x.dim() - 1:
                raise ValueError(f'{iq.qname}: IntLayerNorm needs PTF factors on the last dim')
            codes = int_layernorm(iq.shifted_codes(x), iq.base_scale, self.weight, self.bias,
                                  oq.scale, oq.zero_point, out_bits=oq.bits, eps=self.eps,
                                  dyadic_bits=self.dyadic_bits, fold_mean=self.fold_mean)
            return oq.dequantize(codes).to(x.dtype)
        y = F.layer_norm(iq(x), self.normalized_shape, self.weight, self.bias, self.eps)
        return oq(y)

    def extra_repr(self):
        return (f'{self.normalized_shape}, eps={self.eps}, dyadic_bits={self.dyadic_bits}, '
                f'fold_mean={self.fold_mean}')
