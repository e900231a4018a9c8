"""Dynamic (run-time) uniform quantizers, the exact-pixel input quantizer, and their integer GEMM.

Dynamic quantization computes Δ and z from the tensor being quantized, at every call, per *row*
(all entries sharing the indices of every axis but ``dim``: per token for (B, N, C) activations,
per attention row for (B, heads, N, N) probabilities) or per group of ``group_size`` consecutive
entries of a row. With q_min, q_max the code range and r the static clipping ratio:

* asymmetric: lo = r·min(min_row x, 0), hi = r·max(max_row x, 0), Δ = (hi − lo)/(q_max − q_min),
  z = clamp(q_min − ⌊lo/Δ⌉, q_min, q_max);
* symmetric, signed: Δ = r·max_row|x| / q_max, z = 0; unsigned: Δ = r·max(max_row x, 0) / q_max;
* codes = clamp(⌊x/Δ⌉ + z, q_min, q_max), x̂ = (codes − z)·Δ.

Integer execution (``dynamic_int_linear``): with per-row activation scales and per-output-channel
weight scales, Σ_k x̂_mk ŵ_nk = Δx_m Δw_n (Σ_k c_mk w_nk − z_m Σ_k w_nk), one int8×int8→int32
GEMM (``torch._int_mm``) plus a rank-1 correction and a float rescale, as onnxruntime's dynamic
quantization and torchao's int8 dynamic-activation kernels do. Group scales split the reduction
into one int GEMM per group, rescaled and summed in float.

Calibration statistics are only the count of observed batches (nothing else is needed), so the
round-robin merge is a sum.
"""
from typing import Optional, Sequence, Tuple

import torch

from .base import (MIN_SCALE, Quantizer, check_bool, check_float, check_int, chunk_step,
                   needs_autograd, round_ste, single_threaded)
from .registry import register_quantizer
from .stats import check_round_robin
from .uniform import integer_range

GRANULARITIES = ('token', 'group')


def dynamic_params(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, signed: bool,
                   clip_ratio, include_zero: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Δ and z per row of ``x`` (reduced over the last dim, kept as size 1)."""
    if symmetric:
        if signed:
            amax = x.abs().amax(dim=-1, keepdim=True)
        else:
            amax = x.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (amax * clip_ratio / qmax).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    lo, hi = lo * clip_ratio, hi * clip_ratio
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_SCALE)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


@register_quantizer()
class DynamicQuantizer(Quantizer):
    """Uniform quantizer with scales computed at run time, per row or per group of a row.

    Args:
        bits: 2..16.
        granularity: ``'token'`` (one Δ, z per row over ``dim``) or ``'group'`` (one per
            ``group_size`` consecutive entries of the row; the row length must be a multiple).
        group_size: entries per group (``granularity='group'``).
        symmetric: z = 0 (signed codes by default) or affine.
        signed: signed codes; defaults to ``symmetric``. Symmetric unsigned: Δ = r·max / q_max
            (non-negative tensors, e.g. attention probabilities).
        clip_ratio: static clipping ratio r ∈ (0, 1] applied to each row's range (a parameter:
            ``get_params`` / ``set_params``, so a search may set it).
        dim: the axis a scale is shared along (default −1: per token / per attention row; −2 on
            (B, heads, N, d) values gives one scale per channel over the tokens, which keeps P·V
            integer).
        include_zero: asymmetric ranges widened to contain 0 (exact zeros; default).

    ``quantize`` / ``dequantize`` are self-contained per call only through ``quantize_dynamic``
    (codes, Δ, z); ``quantize(x)`` returns the codes and keeps Δ, z of that call for the next
    ``dequantize``.
    """

    PARAMS = ('clip_ratio',)

    def __init__(self, bits: int = 8, granularity: str = 'token', group_size: int = 32,
                 symmetric: bool = False, signed: Optional[bool] = None, clip_ratio: float = 1.0,
                 dim: int = -1, include_zero: bool = True):
        super().__init__(bits)
        if granularity not in GRANULARITIES:
            raise ValueError(f'DynamicQuantizer: granularity must be one of {GRANULARITIES}, '
                             f'got {granularity!r}')
        self.granularity = granularity
        self.group_size = check_int(self, 'group_size', group_size, 1)
        self.symmetric = check_bool(self, 'symmetric', symmetric)
        self.signed = self.symmetric if signed is None else check_bool(self, 'signed', signed)
        self.dim = check_int(self, 'dim', dim)
        self.include_zero = check_bool(self, 'include_zero', include_zero)
        check_float(self, 'clip_ratio', clip_ratio, 0.0, 1.0, lo_open=True)
        self.qmin, self.qmax = integer_range(bits, self.signed)
        self.register_buffer('clip_ratio', torch.tensor(float(clip_ratio)))
        self._num_batches = 0
        self._last = None

    # --- calibration: nothing to collect ------------------------------------------------------
    def observe(self, x):
        self._num_batches += 1

    def finalize(self):
        self.mark_calibrated()

    def reset_stats(self):
        self._num_batches = 0

    @property
    def num_observed(self) -> int:
        return self._num_batches

    def calibration_stats(self):
        return {'num_batches': self._num_batches}

    def load_calibration_stats(self, stats):
        self._num_batches = int(stats['num_batches'])

    def merge_calibration_stats(self, per_rank):
        return {'num_batches': check_round_robin([s['num_batches'] for s in per_rank])}

    def set_params(self, clip_ratio=None):
        if clip_ratio is not None:
            check_float(self, 'clip_ratio', float(clip_ratio), 0.0, 1.0, lo_open=True)
        self._assign_params({'clip_ratio': clip_ratio})

    # --- layout: rows on the last axis, groups split off ---------------------------------------
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with ``dim`` last and, for groups, split into (..., G, group_size)."""
        if x.dim() == 0:
            raise ValueError(f'{self.qname}: dynamic quantization needs at least one axis')
        xr = x.movedim(self.dim, -1) if self.dim % x.dim() != x.dim() - 1 else x
        if self.granularity == 'group':
            n = xr.shape[-1]
            if n % self.group_size:
                raise ValueError(f'{self.qname}: row length {n} (axis {self.dim} of shape '
                                 f'{tuple(x.shape)}) is not a multiple of group_size={self.group_size}')
            xr = xr.reshape(*xr.shape[:-1], n // self.group_size, self.group_size)
        return xr

    def _unrows(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.granularity == 'group':
            t = t.reshape(*t.shape[:-2], -1)
        return t.movedim(-1, self.dim) if self.dim % like.dim() != like.dim() - 1 else t

    def quantize_dynamic(self, x: torch.Tensor):
        """(codes, Δ, z) of this call. Codes have ``x``'s shape (int32); Δ and z have ``x``'s
        shape with axis ``dim`` replaced by the number of groups (1 for ``'token'``)."""
        xr = self._rows(x)
        scale, zp = dynamic_params(xr, self.qmin, self.qmax, self.symmetric, self.signed,
                                   self.clip_ratio.to(x.dtype), self.include_zero)
        codes = torch.clamp(torch.round(xr / scale) + zp, self.qmin, self.qmax).to(torch.int32)
        if self.granularity == 'group':
            scale, zp = scale.squeeze(-1), zp.squeeze(-1)
            scale, zp = (t.movedim(-1, self.dim) if self.dim % x.dim() != x.dim() - 1 else t
                         for t in (scale, zp))
        else:
            scale, zp = self._unrows(scale, x), self._unrows(zp, x)
        return self._unrows(codes, x), scale, zp

    def dequantize_dynamic(self, codes: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor) -> torch.Tensor:
        """(codes − z)·Δ with Δ, z as ``quantize_dynamic`` returns them."""
        if self.granularity == 'group':
            scale = scale.repeat_interleave(self.group_size, dim=self.dim)
            zero_point = zero_point.repeat_interleave(self.group_size, dim=self.dim)
        return (codes.to(scale.dtype) - zero_point) * scale

    def quantize(self, x):
        codes, scale, zp = self.quantize_dynamic(x)
        self._last = (scale, zp)
        return codes

    def dequantize(self, codes):
        if self._last is None:
            raise RuntimeError(f'{self.qname}: dynamic codes carry no scale; call quantize() first '
                               'or use quantize_dynamic / dequantize_dynamic')
        return self.dequantize_dynamic(codes, *self._last)

    def fake_quant(self, x):
        if needs_autograd(x) or x.dim() == 0:
            xr = self._rows(x)
            scale, zp = dynamic_params(xr.detach(), self.qmin, self.qmax, self.symmetric,
                                       self.signed, self.clip_ratio.to(x.dtype), self.include_zero)
            out = (torch.clamp(round_ste(xr / scale) + zp, self.qmin, self.qmax) - zp) * scale
            return self._unrows(out, x)
        return self._fake_quant_chunked(x)

    @torch.no_grad()
    @single_threaded
    def _fake_quant_chunked(self, x):
        """The same values in cache-sized row chunks (no autograd)."""
        xr = self._rows(x).contiguous()
        width = xr.shape[-1]
        flat = xr.reshape(-1, width)
        out = torch.empty_like(flat)
        r = self.clip_ratio.to(x.dtype)
        step = chunk_step(width, device=x.device)
        for i in range(0, flat.shape[0], step):
            xs, o = flat[i:i + step], out[i:i + step]
            scale, zp = dynamic_params(xs, self.qmin, self.qmax, self.symmetric, self.signed, r,
                                       self.include_zero)
            torch.div(xs, scale, out=o)
            o.round_().add_(zp).clamp_(self.qmin, self.qmax).sub_(zp).mul_(scale)
        return self._unrows(out.view(xr.shape), x)

    def extra_repr(self):
        gran = (f'group_size={self.group_size}' if self.granularity == 'group' else 'per-token')
        return (f'bits={self.bits}, {gran}, dim={self.dim}, symmetric={self.symmetric}, '
                f'signed={self.signed}, clip_ratio={float(self.clip_ratio):g}, mode={self.mode}')


SOFTMAX_GRIDS = ('uniform', 'log2', 'log_sqrt2')


@register_quantizer()
class DynamicSoftmaxQuantizer(DynamicQuantizer):
    """Attention probabilities with one scale per attention row, M_i = max_j p_ij.

    ``grid='uniform'``: Δ_i = M_i / q_max, z = 0, unsigned codes (the row maximum is exact).
    ``grid='log2'`` / ``'log_sqrt2'``: codes c = ⌊−k·log2(p / M_i)⌉ (k = 1, 2) for c ≤ 2^b − 2,
    p̂ = M_i · 2^(−c/k); the code 2^b − 1 stands for 0 (every p below the last level). The per-row
    counterpart of LIS / RepQ-ViT's log√2: M_i factors out of the row of P·V, and 2^(−c/k) is a
    shift (times √2 for odd c), so the row stays integer.
    """

    def __init__(self, bits: int = 8, clip_ratio: float = 1.0, grid: str = 'uniform'):
        super().__init__(bits, granularity='token', symmetric=True, signed=False,
                         clip_ratio=clip_ratio, dim=-1)
        if grid not in SOFTMAX_GRIDS:
            raise ValueError(f'DynamicSoftmaxQuantizer: grid must be one of {SOFTMAX_GRIDS}, '
                             f'got {grid!r}')
        self.grid = grid

    @property
    def _k(self):
        return 1.0 if self.grid == 'log2' else 2.0

    def quantize_dynamic(self, x):
        if self.grid == 'uniform':
            return super().quantize_dynamic(x)
        row_max = (x.amax(dim=-1, keepdim=True) * self.clip_ratio.to(x.dtype)).clamp(min=MIN_SCALE)
        zero_code = 2 ** self.bits - 1
        c = torch.round(-self._k * torch.log2((x / row_max).clamp(min=1e-30)))
        c = torch.where(x > 0, c.clamp(min=0), torch.full_like(c, zero_code))
        codes = torch.where(c > zero_code - 1, torch.full_like(c, zero_code), c).to(torch.int32)
        return codes, row_max, torch.zeros_like(row_max)

    def dequantize_dynamic(self, codes, scale, zero_point):
        if self.grid == 'uniform':
            return super().dequantize_dynamic(codes, scale, zero_point)
        c = codes.to(scale.dtype)
        out = scale * torch.pow(2.0, -c / self._k)
        return torch.where(codes == 2 ** self.bits - 1, torch.zeros_like(out), out)

    def fake_quant(self, x):
        if self.grid == 'uniform':
            return super().fake_quant(x)
        if needs_autograd(x):   # straight-through
            out = self.dequantize_dynamic(*self.quantize_dynamic(x.detach()))
            return x + (out - x).detach()
        return self._log_fake_quant_chunked(x)

    @torch.no_grad()
    @single_threaded
    def _log_fake_quant_chunked(self, x):
        """The same values in cache-sized row chunks (attention rows can be 10^8 entries)."""
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(flat)
        step = chunk_step(flat.shape[-1], device=x.device)
        for i in range(0, flat.shape[0], step):
            out[i:i + step] = self.dequantize_dynamic(*self.quantize_dynamic(flat[i:i + step]))
        return out.view(x.shape)

    def extra_repr(self):
        return super().extra_repr() + f', grid={self.grid}'


@register_quantizer()
class PixelInputQuantizer(Quantizer):
    """The normalized image on the grid of its uint8 pixels: exact for every real pixel.

    x = (p − mean_c)/std_c with integer p ∈ [0, 2^bits − 1], so codes = clamp(⌊x·std_c + mean_c⌉)
    recover p exactly and x̂ = (codes − mean_c)/std_c = x. ``mean`` and ``std`` are in pixel
    units (mmdet's data preprocessor: 123.675, … / 58.395, …; timm: 255·0.485, … / 255·0.229, …).
    Integer execution: the patch embedding reads the pixels with the normalization folded into
    its weights and bias (``fold_pixel_normalization``). Only values that are not pixels (padding
    written as 0 after normalization, i.e. pixel value mean_c) are rounded.
    """

    PARAMS = ('mean', 'std')

    def __init__(self, mean: Sequence[float] = (123.675, 116.28, 103.53),
                 std: Sequence[float] = (58.395, 57.12, 57.375), bits: int = 8, ch_axis: int = 1):
        super().__init__(bits)
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std) or not mean:
            raise ValueError(f'PixelInputQuantizer: mean and std need the same non-zero length, '
                             f'got {len(mean)} and {len(std)}')
        if any(s <= 0 for s in std):
            raise ValueError(f'PixelInputQuantizer: std must be positive, got {std}')
        self.ch_axis = check_int(self, 'ch_axis', ch_axis)
        self.qmin, self.qmax = integer_range(bits, False)
        self.register_buffer('mean', torch.tensor(mean))
        self.register_buffer('std', torch.tensor(std))
        self._num_batches = 0
        self.mark_calibrated()

    def observe(self, x):
        self._num_batches += 1

    def finalize(self):
        self.mark_calibrated()

    def reset_stats(self):
        self._num_batches = 0

    @property
    def num_observed(self) -> int:
        return self._num_batches

    def calibration_stats(self):
        return {'num_batches': self._num_batches}

    def load_calibration_stats(self, stats):
        self._num_batches = int(stats['num_batches'])

    def merge_calibration_stats(self, per_rank):
        return {'num_batches': check_round_robin([s['num_batches'] for s in per_rank])}

    def _bc(self, p, x):
        shape = [1] * x.dim()
        shape[self.ch_axis % x.dim()] = -1
        return p.to(x.dtype).reshape(shape)

    def quantize(self, x):
        if x.shape[self.ch_axis] != self.mean.numel():
            raise ValueError(f'{self.qname}: input has {x.shape[self.ch_axis]} channels on axis '
                             f'{self.ch_axis}, mean/std have {self.mean.numel()}')
        codes = torch.round(x * self._bc(self.std, x) + self._bc(self.mean, x))
        return codes.clamp(self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, codes):
        x = codes.to(self.mean.dtype)
        return (x - self._bc(self.mean, x)) / self._bc(self.std, x)

    def fake_quant(self, x):
        if needs_autograd(x):
            p = round_ste(x * self._bc(self.std, x) + self._bc(self.mean, x))
            return (p.clamp(self.qmin, self.qmax) - self._bc(self.mean, x)) / self._bc(self.std, x)
        return self.dequantize(self.quantize(x)).to(x.dtype)


def fold_pixel_normalization(weight: torch.Tensor, bias: Optional[torch.Tensor], mean, std):
    """(W', b') with conv(p, W', b') = conv((p − mean)/std, W, b) for a convolution without
    padding (ViT patch embedding): W'_oc.. = W_oc../std_c, b'_o = b_o − Σ W'_oc.. · mean_c."""
    mean = torch.as_tensor(mean, dtype=weight.dtype, device=weight.device)
    std = torch.as_tensor(std, dtype=weight.dtype, device=weight.device)
    w = weight / std.view(1, -1, *([1] * (weight.dim() - 2)))
    shift = (w * mean.view(1, -1, *([1] * (weight.dim() - 2)))).sum(dim=tuple(range(1, w.dim())))
    b = -shift if bias is None else bias - shift
    return w, b


# --- integer execution ---------------------------------------------------------------------------
def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 matrices a (M, K) and b (K, N): ``torch._int_mm`` (CPU and
    CUDA; on CUDA it needs M > 16 and K, N multiples of 8), else an exact float64 product (every
    partial sum is an integer below 2^53)."""
    try:
        return torch._int_mm(a.contiguous(), b.contiguous())
    except RuntimeError:
        return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


def _int8_codes(codes: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    """Codes and zero points shifted into int8 (unsigned 8-bit codes by −128; the shift cancels in
    codes − z)."""
    if qmin < -128 or qmax > 255 or (qmin < 0 and qmax > 127):
        raise ValueError(f'integer GEMM needs codes of at most 8 bits, got [{qmin}, {qmax}]')
    shift = 128 if qmax > 127 else 0
    return (codes - shift).to(torch.int8), zero_point - shift


def dynamic_int_linear(x: torch.Tensor, act: DynamicQuantizer, w_codes: torch.Tensor,
                       w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       w_zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(act.fake_quant(x), ŵ, bias)`` in integer arithmetic.

    ``act``: a per-token or per-group ``DynamicQuantizer`` (``dim=-1``) of at most 8 bits.
    ``w_codes`` (N, K): weight codes of at most 8 bits; ŵ = (w_codes − z_w)·Δw with ``w_scale``
    (N,) per output channel, or (N, K/group_size) per group with a group-wise ``act``, and
    ``w_zero_point`` z_w (N,) (asymmetric weights, e.g. GPTQ / RepQ-ViT; default 0). Per group of
    K' inputs: Σ(c − z)(w − z_w) = Σ c·w − z Σ w − z_w Σ c + K' z z_w, where Σ c·w is one exact int32
    GEMM (``torch._int_mm``) and the rest are row / column sums; only the rescale is float.
    """
    if act.dim % x.dim() != x.dim() - 1:
        raise ValueError('dynamic_int_linear: the activation quantizer must share scales along '
                         'the last (reduction) axis, dim=-1')
    lead, K = x.shape[:-1], x.shape[-1]
    N = w_codes.shape[0]
    codes, scale, zp = act.quantize_dynamic(x.reshape(-1, K))
    codes, zp = _int8_codes(codes, zp, act.qmin, act.qmax)
    wz = (torch.zeros(N, dtype=torch.int32, device=x.device) if w_zero_point is None
          else w_zero_point.reshape(N).round().to(torch.int32))
    if int(w_codes.min()) < -128 or int(w_codes.max()) > 255:
        raise ValueError('dynamic_int_linear: weight codes must fit 8 bits')
    if int(w_codes.max()) > 127:   # unsigned 8-bit weight codes: shift into int8 (cancels in w − z_w)
        w_codes, wz = w_codes - 128, wz - 128
    wq = w_codes.to(torch.int8)
    groups = scale.shape[-1]
    gs = K // groups
    ws = w_scale.reshape(N, -1).to(torch.float32)
    if ws.shape[1] not in (1, groups):
        raise ValueError(f'dynamic_int_linear: weight scales {tuple(w_scale.shape)} match neither '
                         f'per-channel nor {groups} groups')
    out = torch.zeros(codes.shape[0], N, dtype=torch.float32, device=x.device)
    for g in range(groups):
        sl = slice(g * gs, (g + 1) * gs)
        acc = int_matmul(codes[:, sl], wq[:, sl].t())
        zg = zp[:, g:g + 1].to(torch.int32)
        acc = (acc - zg * wq[:, sl].to(torch.int32).sum(1)
               - codes[:, sl].to(torch.int32).sum(1, keepdim=True) * wz + gs * zg * wz)
        out += acc.to(torch.float32) * scale[:, g:g + 1].to(torch.float32) * \
            ws[:, min(g, ws.shape[1] - 1)]
    if bias is not None:
        out += bias.to(torch.float32)
    return out.reshape(*lead, N).to(x.dtype)


def symmetric_weight_codes(weight: torch.Tensor, bits: int = 8, group_size: Optional[int] = None):
    """Per-output-channel (or per-group) symmetric codes and scales of a Linear weight (N, K):
    Δ = max|w| / q_max (the ``DynamicQuantizer(symmetric=True)`` grid along the input axis)."""
    q = DynamicQuantizer(bits, granularity='group' if group_size else 'token',
                         group_size=group_size or 1, symmetric=True)
    codes, scale, _ = q.quantize_dynamic(weight.detach())
    return codes, scale.reshape(weight.shape[0], -1)


__all__ = ['DynamicQuantizer', 'DynamicSoftmaxQuantizer', 'PixelInputQuantizer', 'dynamic_params',
           'dynamic_int_linear', 'fold_pixel_normalization', 'int_matmul', 'symmetric_weight_codes']
