"""FQ-ViT Power-of-Two Factor (PTF) quantizer and integer LayerNorm (functions; the module that
runs them is ``fqvit_det.nn.modules.QuantLayerNorm``).

PTF (for LayerNorm inputs, i.e. the residual stream, whose channels differ in range by orders of
magnitude). With K power-of-two factors and b bits:

* global range over all channels [min, max] (widened to contain 0 unless ``include_zero=False``,
  FQ-ViT's choice);
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

from .base import (MIN_SCALE, Quantizer, broadcast_param, check_bool, check_ch_axis, check_int,
                   chunk_step, is_integral, needs_autograd, round_ste, scratch, single_threaded)
from .registry import build_observer, register_quantizer
from .stats import check_round_robin, last_of, to_cpu, to_device
from .uniform import UniformQuantizer, check_observer_cfg, fake_quant_chunked


@register_quantizer()
class PTFQuantizer(Quantizer):
    """Power-of-Two-Factor quantizer (FQ-ViT), channel-wise factors along ``ch_axis``.

    Args:
        bits: bit-width of the (unsigned) codes.
        ch_axis: channel axis (the hidden dimension; last axis for (B, N, C) token tensors).
        num_factors: K, the largest power-of-two factor exponent (α ∈ {0..K}).
        observer: observer config; must be per-channel capable (MinMax, EMA, Percentile). It is
            built with ``ch_axis``; the global range is the min/max over its channel ranges.
        include_zero: widen the global range to contain 0 (default). FQ-ViT: ``False``.
    """

    PARAMS = ('base_scale', 'zero_point', 'alpha')

    def __init__(self, bits: int = 8, ch_axis: int = -1, num_factors: int = 3, observer=None,
                 include_zero: bool = True):
        super().__init__(bits)
        self.include_zero = check_bool(self, 'include_zero', include_zero)
        self.ch_axis = check_ch_axis(self, ch_axis, allow_none=False)
        self.num_factors = check_int(self, 'num_factors', num_factors, 0, 16)
        self.qmin, self.qmax = 0, 2 ** bits - 1
        observer = check_observer_cfg(self, observer)
        if observer['type'] not in ('MinMaxObserver', 'EMAObserver', 'PercentileObserver'):
            raise ValueError(f'PTFQuantizer: observer must be MinMaxObserver, EMAObserver or '
                             f'PercentileObserver (per-channel ranges), got {observer["type"]!r}')
        self.observer = build_observer(observer, ch_axis=ch_axis)
        self.register_buffer('base_scale', torch.ones(()))
        self.register_buffer('zero_point', torch.zeros(()))
        self.register_buffer('alpha', torch.zeros((), dtype=torch.long))
        # Last calibration batch (for choosing α); a plain attribute, so never in the state_dict.
        self._last = None

    # --- calibration ------------------------------------------------------------------------
    def observe(self, x):
        self.observer.update(x)
        self._last = x.detach().float().clone()

    @property
    def num_observed(self) -> int:
        return self.observer.num_batches

    def reset_stats(self):
        self.observer.reset_stats()
        self._last = None

    def calibration_stats(self):
        """``{'num_batches', 'observer': the observer's statistics, 'last': the last batch}``."""
        return {'num_batches': self.num_observed, 'observer': self.observer.stats(),
                'last': to_cpu(self._last)}

    def load_calibration_stats(self, stats):
        self.observer.load_stats(stats['observer'], self.device)
        self._last = to_device(stats['last'], self.device)

    def merge_calibration_stats(self, per_rank):
        counts = [int(s['num_batches']) for s in per_rank]
        total = check_round_robin(counts, self.qname)
        r = last_of(counts)
        return {'num_batches': total,
                'observer': self.observer.merge_stats([s['observer'] for s in per_rank]),
                'last': None if r is None else per_rank[r]['last']}

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
        gmin, gmax = min_c.min().float(), max_c.max().float()
        if self.include_zero:
            gmin, gmax = torch.clamp(gmin, max=0.0), torch.clamp(gmax, min=0.0)
        # Δ_b is clamped so that Δ_1 = Δ_b / 2^K never falls below MIN_SCALE (all-zero input).
        scale_b = ((gmax - gmin) / (self.qmax - self.qmin)).clamp(min=MIN_SCALE * 2 ** self.num_factors)
        zero_point = (self.qmin - torch.round(gmin / scale_b)).clamp(self.qmin, self.qmax)
        base = scale_b / 2 ** self.num_factors
        x = self._last.to(base.device)
        errs = torch.stack([self.channel_error(x, base * 2 ** a, zero_point)
                            for a in range(self.num_factors + 1)])
        alpha = errs.argmin(dim=0)  # ties -> the smallest factor (finest step)
        self._last = None
        self.set_params(base_scale=base, zero_point=zero_point, alpha=alpha)

    def set_params(self, base_scale=None, zero_point=None, alpha=None):
        """Set Δ_1 (scalar), the shared zero point (scalar) and / or α ([C], ints in 0..K)."""
        if alpha is not None:
            alpha = torch.as_tensor(alpha).detach()
            if alpha.is_floating_point() and not torch.equal(alpha, alpha.round()):
                raise ValueError(f'{self.qname}: alpha must be integer-valued, got {alpha}')
            if bool((alpha < 0).any()) or bool((alpha > self.num_factors).any()):
                raise ValueError(f'{self.qname}: alpha must lie in [0, {self.num_factors}]')
        self._assign_params({'base_scale': base_scale, 'zero_point': zero_point, 'alpha': alpha})

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
        if not needs_autograd(x, self.base_scale):
            out = fake_quant_chunked(x, self.channel_scale, self.zero_point, self.qmin, self.qmax,
                                     self.ch_axis)
            if out is not None:
                return out.to(x.dtype)
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


def div_round_half_even(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """⌊num / den⌉ with ties to even, in integers (int64, den > 0): ``torch.round`` semantics."""
    q = torch.div(num, den, rounding_mode='floor')
    twice_rem = 2 * (num - q * den)
    up = (twice_rem > den) | ((twice_rem == den) & (torch.remainder(q, 2) == 1))
    return q + up.to(q.dtype)


def int_layernorm_reference(shifted_codes: torch.Tensor, base_scale, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], out_scale, out_zero_point,
                            out_bits: int = 8, eps: float = 1e-5, dyadic_bits: int = 8,
                            fold_mean: bool = True) -> torch.Tensor:
    """FQ-ViT integer LayerNorm over the last dim; returns unsigned output codes (int32).

    This is the literal int64 implementation (the specification); ``int_layernorm`` computes the
    same codes bit for bit, faster.

    Input x_c are integer codes in units of Δ_1 (``PTFQuantizer.shifted_codes``): x = Δ_1 · x_c.
    Derivation (per token, channel c; C channels, S1 = Σ x_c, S2 = Σ x_c²):

        μ = Δ_1 · S1 / C,  σ = Δ_1 / C · sqrt(C·S2 − S1² + eps·C²/Δ_1²) = sqrt(Var + eps)
        LN(x)_c / Δ_out = A_c · x_c + B'_c,  A_c = Δ_1 γ_c / (σ Δ_out),  B'_c = (β_c − μ γ_c / σ) / Δ_out

    i.e. the mean is folded into the bias, and x_c enters un-centred. A_c becomes the dyadic number
    sign(A)·M·2^−N with a ``dyadic_bits``-bit M:  N = clamp(dyadic_bits − 1 − ⌊log2|A|⌋, 0, 31),
    M = clamp(⌊|A|·2^N⌋, 0, 2^dyadic_bits − 1), and B = ⌊B'·2^N⌉, so the integer output is

        y_q = clamp(⌊(sign(A)·M·x_c + B) / 2^N⌉ + z_out, 0, 2^out_bits − 1)

    where ⌊·⌉ rounds ties to even, as FQ-ViT's ``torch.round`` of the shifted value (a hardware
    shift with a +2^(N−1) offset would round ties up instead).
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
    y = div_round_half_even(m * xin + b, two_n)
    z_out = torch.as_tensor(out_zero_point, device=x.device).round().to(torch.int64)
    return torch.clamp(y + z_out, 0, 2 ** out_bits - 1).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Fast integer LayerNorm: the same integer codes as ``int_layernorm_reference``, bit for bit
# ---------------------------------------------------------------------------------------------
# Every integer of the reference is carried exactly in float64 (integers below 2^53 are exact, and
# +, −, · of such integers stay exact while the results stay below 2^53); division by 2^n is an
# exact power-of-two scaling. Every other float64 step repeats the reference's own expression in
# the same order. Bounds are checked per chunk of rows; a chunk that could leave the exact range
# (or holds NaN) is computed by the reference instead, so the result never differs.
#
# ⌊log2 |a|⌋ of the reference is read from the float64 exponent field of |a| (2^⌊log2 |a|⌋ is a
# bit mask). torch.log2 is accurate to about one ulp, so its floor can only differ from the
# exponent when |a| lies within a relative ~2^−42 of a power of two; a chunk where some |a|·2^n
# falls within 2^−36 of either end of [2^(d−1), 2^d) takes the literal log2 route instead, as
# does a chunk where n is clamped for some entry (tiny or huge multipliers, γ = 0).
_EXACT_LIMIT = 2.0 ** 52
_EXP_MASK = 0x7FF0000000000000
_EDGE = 2.0 ** -36
_TWO_POW = torch.exp2(torch.arange(0, 32, dtype=torch.float64))
# exp2 of small integers is exact on every CPU we know of; checked once, else a table lookup.
_EXP2_EXACT = bool(torch.equal(_TWO_POW, torch.tensor([2.0 ** k for k in range(32)],
                                                      dtype=torch.float64)))


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2^n for integer-valued float64 n in [0, 31], exactly."""
    if _EXP2_EXACT:
        return torch.exp2(n)
    return _TWO_POW.to(n.device)[n.to(torch.int64)]


def _ln_params(base_scale, weight, bias, out_scale, C: int, device):
    delta1 = torch.as_tensor(base_scale, dtype=torch.float64, device=device)
    delta_out = torch.as_tensor(out_scale, dtype=torch.float64, device=device)
    gamma = (torch.ones(C, dtype=torch.float64, device=device) if weight is None
             else weight.detach().to(torch.float64))
    beta = (torch.zeros(C, dtype=torch.float64, device=device) if bias is None
            else bias.detach().to(torch.float64))
    ok = (delta1.numel() == 1 and delta_out.numel() == 1 and gamma.shape == (C,)
          and beta.shape == (C,) and bool(torch.isfinite(gamma).all())
          and bool(torch.isfinite(beta).all()) and float(delta1) > 0 and float(delta_out) > 0
          and math.isfinite(float(delta1)) and math.isfinite(float(delta_out)))
    if not ok:
        return None
    # sign(a) = sign(γ) (Δ_1/σ > 0, Δ_out > 0) and IEEE ·, / are sign-symmetric, so |a| is
    # computed exactly from |γ| and the sign of M is a per-channel factor (None: all γ ≥ 0)
    neg = gamma < 0
    beta_out = beta / delta_out
    return dict(delta1=delta1, delta_out=delta_out, gamma=gamma, beta=beta,
                gamma_abs=gamma.abs(), gamma_absmax=float(gamma.abs().max()),
                beta_absmax=float(beta.abs().max()), beta_out=beta_out,
                beta_out_absmax=float(beta_out.abs().max()),
                sign=torch.where(neg, -1.0, 1.0).to(torch.float64) if bool(neg.any()) else None)


def _int_layernorm_rows(x: torch.Tensor, params, eps: float, dyadic_bits: int, fold_mean: bool):
    """Integer LayerNorm of the rows of ``x`` (float64 (rows, C) holding exact integer codes).

    Returns y = ⌊(M·x + B) / 2^N⌉ (ties to even; float64, integer-valued, before the output zero
    point) in a scratch buffer, or ``None`` where an exactness bound fails (the caller then uses
    the reference for these rows).
    """
    dev = x.device
    delta1, delta_out, gamma = params['delta1'], params['delta_out'], params['gamma']
    C = x.shape[-1]
    s1 = x.sum(dim=-1, keepdim=True)
    s2 = torch.mul(x, x, out=scratch('ln_sq', x.shape, torch.float64, dev)).sum(dim=-1,
                                                                                 keepdim=True)
    s2_max = float(s2.max())
    if not s2_max * C < _EXACT_LIMIT:        # also False for NaN: C·S2 and S1² ≤ C·S2 exact
        return None
    d = C * s2 - s1 * s1                     # = the reference's exact int64 value, as float64
    sigma = delta1 / C * torch.sqrt(d + eps * C * C / (delta1 * delta1))
    mu = delta1 * s1 / C
    if not bool((sigma > 0).all()):
        return None
    top = 2.0 ** dyadic_bits
    # |B| ≤ (max|β| + |μ/σ|·max|γ|)/Δ_out·2^31 (+ rounding), |M·x_in| ≤ 2^d·max|x_in|
    if fold_mean:
        mu_sigma = mu / sigma
        b_bound = ((params['beta_absmax'] + float(mu_sigma.abs().max()) * params['gamma_absmax'])
                   / float(delta_out))
    else:
        b_bound = params['beta_out_absmax']
    x_bound = math.sqrt(s2_max) * (1 if fold_mean else 2 * C) + 1
    if not b_bound * (1 + 2.0 ** -20) * 2.0 ** 31 + 1 + top * x_bound < _EXACT_LIMIT:
        return None

    def abs_a(out):                          # |a| = Δ_1/σ·|γ|/Δ_out (/C), exactly as the reference
        torch.mul(delta1 / sigma, params['gamma_abs'], out=out).div_(delta_out)
        return out.div_(C) if not fold_mean else out

    a = abs_a(scratch('ln_a', x.shape, torch.float64, dev))
    two_n = scratch('ln_two_n', x.shape, torch.float64, dev)
    torch.bitwise_and(a.view(torch.int64), _EXP_MASK, out=two_n.view(torch.int64))
    two_n.reciprocal_().mul_(top / 2).clamp_(1.0, 2.0 ** 31)     # 2^(d−1−⌊log2|a|⌋), clamped
    m = a.mul_(two_n)                        # |a|·2^n ∈ [2^(d−1), 2^d) unless n is clamped
    m_lo, m_hi = torch.aminmax(m)
    if float(m_lo) >= top / 2 * (1 + _EDGE) and float(m_hi) <= top * (1 - _EDGE):
        m.floor_()                           # M = ⌊|a|·2^n⌋ ≤ 2^d − 1: the clamp is a no-op
    else:                                    # literal route: n from torch.log2 as the reference
        a = abs_a(a)
        n = a.clamp(min=torch.finfo(torch.float64).tiny).log2_().floor_()
        n.neg_().add_(dyadic_bits - 1).clamp_(0, 31)
        two_n = _pow2(n)
        m = a.mul_(two_n).floor_().clamp_(0, top - 1)
    b = scratch('ln_b', x.shape, torch.float64, dev)
    if fold_mean:                            # round((β − μ/σ·γ)/Δ_out·2^n)
        torch.mul(mu_sigma, gamma, out=b)
        torch.sub(params['beta'], b, out=b).div_(delta_out).mul_(two_n)
        xin = x
    else:                                    # round(β/Δ_out·2^n); x_in = C·x − S1
        torch.mul(params['beta_out'], two_n, out=b)
        xin = torch.mul(x, C, out=scratch('ln_xin', x.shape, torch.float64, dev)).sub_(s1)
    b.round_()
    if params['sign'] is not None:
        m.mul_(params['sign'])               # M = sign(γ)·⌊|a|·2^n⌋ (a zero M's sign is irrelevant)
    # y = ⌊(M·x + B) / 2^n⌉, ties to even: M·x + B is exact below 2^52 and the division by 2^n is
    # exact, so torch.round (half to even) rounds the exact quotient; + 0 turns a −0.0 (a small
    # negative quotient rounded to zero) into the reference's integer 0
    return b.addcmul_(m, xin).div_(two_n).round_().add_(0.0)


@torch.no_grad()   # integer codes: no gradient, as in the reference
@single_threaded
def int_layernorm(shifted_codes: torch.Tensor, base_scale, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], out_scale, out_zero_point, out_bits: int = 8,
                  eps: float = 1e-5, dyadic_bits: int = 8, fold_mean: bool = True) -> torch.Tensor:
    """FQ-ViT integer LayerNorm over the last dim; returns unsigned output codes (int32).

    Bit-identical to ``int_layernorm_reference`` (see there for the algorithm), computed in
    cache-sized row chunks with exact float64 integer arithmetic.
    """
    def reference(codes):
        return int_layernorm_reference(codes, base_scale, weight, bias, out_scale,
                                       out_zero_point, out_bits, eps, dyadic_bits, fold_mean)

    x = shifted_codes
    if x.dim() == 0 or x.numel() == 0 or x.is_complex():
        return reference(x)
    C = x.shape[-1]
    params = _ln_params(base_scale, weight, bias, out_scale, C, x.device)
    z_out = torch.as_tensor(out_zero_point, device=x.device).round()
    if params is None or z_out.numel() != 1:
        return reference(x)
    z_out = float(z_out)
    x2 = x.reshape(-1, C)
    out = torch.empty(x2.shape, dtype=torch.int32, device=x.device)
    step = chunk_step(C, device=x.device)
    for i in range(0, x2.shape[0], step):
        xc = x2[i:i + step]
        xf = scratch('lni_x', xc.shape, torch.float64, x.device)
        y = _int_layernorm_rows(xf.copy_(xc), params, eps, dyadic_bits, fold_mean)
        if y is None:
            out[i:i + step] = reference(xc)
        else:
            out[i:i + step] = y.add_(z_out).clamp_(0, 2 ** out_bits - 1)
    return out.reshape(x.shape)


def layernorm_fake_quant_setup(x: torch.Tensor, iq: 'PTFQuantizer', weight, bias,
                               oq: UniformQuantizer):
    """The constants of ``int_layernorm_fake_quant``'s exact-float64 route, or None where it
    does not apply (the reference then runs): per-channel PTF scale ``s_in`` and 2^α ``factor``,
    the code ranges (zero points folded), the LayerNorm parameters (``_ln_params``)."""
    C = x.shape[-1] if x.dim() else 0
    s_in = iq.channel_scale
    fast = (x.dim() >= 1 and x.numel() > 0 and x.is_floating_point()
            and iq.ch_axis % x.dim() == x.dim() - 1 and s_in.numel() in (1, C)
            and iq.zero_point.numel() == 1 and is_integral(iq.zero_point)
            and iq.alpha.numel() in (1, C) and bool((iq.alpha >= 0).all())
            and iq.bits + int(iq.alpha.max()) < 24
            and oq.scale.numel() == 1 and oq.zero_point.numel() == 1
            and oq.scale.dtype == oq.zero_point.dtype == torch.float32
            and is_integral(oq.zero_point))
    params = _ln_params(iq.base_scale, weight, bias, oq.scale, C, x.device) if fast else None
    if params is None:
        return None
    zp_in = float(iq.zero_point)
    z_out = float(oq.zero_point)                         # integral: round(z) = z
    return dict(C=C, s_in=s_in, params=params,
                factor=torch.pow(2.0, iq.alpha.to(torch.float64)).reshape(-1),
                lo_in=0.0 - zp_in, hi_in=iq.qmax - zp_in,   # clamp(q + z, 0, qmax) − z
                lo_out=0.0 - z_out, hi_out=(2 ** oq.bits - 1) - z_out,
                s_out=float(oq.scale))                   # float32 value, exact as a double


@torch.no_grad()   # integer codes: no gradient, as in the reference
@single_threaded
def int_layernorm_fake_quant(x: torch.Tensor, in_quantizer: 'PTFQuantizer', weight, bias,
                             out_quantizer: UniformQuantizer, eps: float = 1e-5,
                             dyadic_bits: int = 8, fold_mean: bool = True) -> torch.Tensor:
    """``out_quantizer.dequantize(int_layernorm(in_quantizer.shifted_codes(x), …)).to(x.dtype)``.

    The PTF input codes, the integer LayerNorm and the dequantization are fused per chunk of
    tokens (bit-identical to composing the reference pieces).
    """
    iq, oq = in_quantizer, out_quantizer

    def reference(xc):
        codes = int_layernorm_reference(iq.shifted_codes(xc), iq.base_scale, weight, bias,
                                        oq.scale, oq.zero_point, out_bits=oq.bits, eps=eps,
                                        dyadic_bits=dyadic_bits, fold_mean=fold_mean)
        return oq.dequantize(codes)

    st = layernorm_fake_quant_setup(x, iq, weight, bias, oq)
    if st is None:
        return reference(x).to(x.dtype)
    C, s_in, params, factor = st['C'], st['s_in'], st['params'], st['factor']
    lo_in, hi_in, lo_out, hi_out, s_out = (st[k] for k in ('lo_in', 'hi_in', 'lo_out', 'hi_out',
                                                           's_out'))
    x2 = x.reshape(-1, C)
    out = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
    step = chunk_step(C, device=x.device)
    for i in range(0, x2.shape[0], step):
        xc = x2[i:i + step]
        # PTF shifted codes (q − z)·2^α: the float32 quotient x/Δ_c (stored as float64), then
        # exact integer arithmetic
        codes = scratch('lnf_codes', xc.shape, torch.float64, x.device)
        torch.div(xc, s_in, out=codes)
        codes.round_().clamp_(lo_in, hi_in).mul_(factor)
        y = _int_layernorm_rows(codes, params, eps, dyadic_bits, fold_mean)
        o = out[i:i + step]
        if y is None:
            o.copy_(reference(xc))
        else:
            # (clamp(y + z, 0, 2^b − 1) − z)·Δ_out = clamp(y, −z, 2^b − 1 − z)·Δ_out: the float64
            # product of these two float32 values is exact, so rounding it once to float32 equals
            # the float32 multiplication of the reference
            torch.mul(y.clamp_(lo_out, hi_out), s_out, out=o)
    return out.reshape(x.shape).to(x.dtype)
