"""ONNX export of a calibrated simulated model (pure torch + onnx).

``export_onnx(model, example_input, path)`` traces the model with ``torch.onnx.export``
(TorchScript exporter, ``dynamo=False``, opset 17) while every quantizer, quantized Linear / Conv
and quantized LayerNorm runs an exportable twin of its simulated forward:

* **Uniform quantizers** (``UniformQuantizer``; ``PTFQuantizer`` = per-channel scales 2^α_c·Δ_1
  with one zero point) become ``QuantizeLinear → DequantizeLinear`` pairs: activations per tensor
  (per axis where the quantizer is per-channel, e.g. PTF on the hidden dimension), uint8 codes
  (a signed symmetric grid is the same grid on uint8 with zero point 128). ONNX QDQ carries 8-bit
  codes; a grid of b < 8 bits (or a zero point outside the code range, RepQ-ViT) is the same uint8
  container with a ``Clip`` *before* ``QuantizeLinear`` to the grid's real range
  [(q_min − z)·Δ, (q_max − z)·Δ] (int4 types need opset 21 and ORT does not fuse them into
  integer MatMuls, so we keep 8-bit containers). A grid no 8-bit container holds (e.g. 8-bit
  with an out-of-range zero point) is written as float ops ``Div, Round, Clip, Mul``.
* **Weights** are stored as int8 initializers (codes q − z with zero point 0 when they fit, else
  uint8 with the zero point) followed by ``DequantizeLinear`` (per-channel ``axis``), so
  onnxruntime's QDQ optimizer can fuse ``DQ → MatMul/Conv (→ Q)`` into integer kernels.
  Linear weights are stored transposed ([in, out], axis 1) and multiplied with ``MatMul``.
* **Non-uniform quantizers** become standard ops that reproduce the fake quantization:
  twin uniform (PTQ4ViT): ``Less/Where, Div, Round, Clip, Mul`` (bit-exact); log2 / log√2
  (FQ-ViT, RepQ-ViT) and AdaLog: ``Div, Log, Mul, Round`` to an approximate code, corrected to
  the code torch's float32 ``log2`` gives by comparing x/Δ with the code's exact float32
  thresholds (found by bisection with torch's own ops), then ``Gather`` from the table of
  dequantized values our quantizer computes (identical codes and values);
  Log-Int-Softmax (FQ-ViT): the logit codes (``Div, Round, Clip``), the row maximum, a ``Gather``
  from the integer-exp table, the exact float64 ratio ``Round(Σe/e)`` and the log2 code by
  ``Log`` with an exact power-of-two correction (bit-exact).
* **FQ-ViT integer LayerNorm** becomes float64 ops carrying exact integers (sums, the dyadic
  multiplier M·2^−N with ⌊log2⌋ corrected against exact powers of two, ties-to-even ``Round``),
  the same integer codes as ``int_layernorm`` (bit-exact while its exactness bounds hold, which
  the simulation itself checks), followed by its output QDQ.

Rounding: ONNX ``QuantizeLinear`` and ``Round`` round half to even, as ``torch.round`` in our
quantizers; ``QuantizeLinear`` computes saturate(round(x / Δ) + z) like our
clamp(round(x / Δ) + z, q_min, q_max). Remaining differences are float summation order in
MatMul / LayerNorm / Softmax kernels and GELU's erf.

``arithmetic='exact'`` writes the integer-exact simulation instead (``fqvit_det.nn.exact``, the
integer model's arithmetic): a quantized Linear / patch convolution on a per-tensor uniform input
is ``QuantizeLinear`` → ``MatMulInteger`` (input and weight zero points) → ``Cast`` → ``Mul``
Δ_x·Δ_w[c] → ``Add`` bias, the ops and order of ``IntegerLinear``; PTQ4ViT's twin-uniform input
is two uint8 ``MatMulInteger`` joined in float64; QKᵀ and P·V run on codes as integer-valued
float32 / float64 ``MatMul`` (exact in any summation order); GELU is ``rational_gelu``'s float32
+, −, ×, ÷. onnxruntime keeps the integer GEMMs and the separate rescale with its optimizations
on, so what can still differ is only float LayerNorm / Softmax kernels. A quantized layer whose
input is not on a grid (PTQ4ViT's patch embedding) is a float64 ``MatMul``, the exact arithmetic
with ``float_input_gemm='float64'``, whose float32 result does not depend on the summation order.
"""
import contextlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.modules import QuantConv2d, QuantLayerNorm, QuantLinear
from ..quantizers.adalog import AdaLogQuantizer, adalog_dequantize
from ..quantizers.base import Quantizer, broadcast_param, is_integral
from ..quantizers.lis import LogIntSoftmax, int_exp_parts
from ..quantizers.log import Log2Quantizer, LogSqrt2Quantizer, log2_dequantize, log_sqrt2_dequantize
from ..quantizers.log import log_code_of
from ..quantizers.log import log_code_thresholds as _log_code_thresholds
from ..quantizers.ptf import PTFQuantizer
from ..quantizers.twin import (TwinUniformGeluQuantizer, TwinUniformSoftmaxQuantizer,
                               twin_gelu_steps, twin_softmax_steps)
from ..quantizers.uniform import UniformQuantizer

DEFAULT_OPSET = 17
SUPPORTED = (UniformQuantizer, PTFQuantizer, LogIntSoftmax, Log2Quantizer, LogSqrt2Quantizer,
             TwinUniformSoftmaxQuantizer, TwinUniformGeluQuantizer, AdaLogQuantizer)


class UnsupportedQuantizerError(TypeError):
    """A quantizer in 'quant' mode has no ONNX form (or cannot be exported in its state)."""


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote: per quantizer / module how it was expressed, and op counts."""
    path: str = ''
    opset: int = DEFAULT_OPSET
    quantizers: Dict[str, str] = field(default_factory=dict)
    weights: Dict[str, str] = field(default_factory=dict)
    layernorms: Dict[str, str] = field(default_factory=dict)
    op_counts: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> Dict[str, int]:
        """How many quantizers / weights / norms took each form."""
        out = Counter()
        for group, table in (('quantizer', self.quantizers), ('weight', self.weights),
                             ('layernorm', self.layernorms)):
            for form in table.values():
                out[f'{group}: {form}'] += 1
        return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# QDQ building blocks (autograd Functions whose ``symbolic`` writes the ONNX nodes)
# ---------------------------------------------------------------------------------------------
def _bcast(p: torch.Tensor, dim: int, axis: Optional[int]) -> torch.Tensor:
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * dim
    shape[axis] = -1
    return p.reshape(shape)


def _container_range(dtype):
    return (0, 255) if dtype == torch.uint8 else (-128, 127)


class _QuantDequant(torch.autograd.Function):
    """QuantizeLinear → DequantizeLinear with ``zero_point``'s dtype as the code type."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis):
        cmin, cmax = _container_range(zero_point.dtype)
        s = _bcast(scale, x.dim(), axis)
        z = _bcast(zero_point.to(torch.float32), x.dim(), axis)
        return (torch.clamp(torch.round(x / s) + z, cmin, cmax) - z) * s

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis):
        kw = {} if axis is None else {'axis_i': axis}
        q = g.op('QuantizeLinear', x, scale, zero_point, **kw)
        return g.op('DequantizeLinear', q, scale, zero_point, **kw)


class _Dequant(torch.autograd.Function):
    """DequantizeLinear of stored integer codes (weights: int8 initializers)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis):
        s = _bcast(scale, codes.dim(), axis)
        z = _bcast(zero_point.to(torch.float32), codes.dim(), axis)
        return (codes.to(torch.float32) - z) * s

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):
        kw = {} if axis is None else {'axis_i': axis}
        return g.op('DequantizeLinear', codes, scale, zero_point, **kw)


@dataclass
class _UniformPlan:
    """How one uniform grid (Δ, z, [q_min, q_max]) is written: see ``uniform_plan``."""
    scale: torch.Tensor                  # float32, scalar or [C]
    lo: torch.Tensor                     # integer-valued float32: q_min − z (scalar or [C])
    hi: torch.Tensor                     # q_max − z
    zero_point: Optional[torch.Tensor]   # uint8 / int8 container zero point; None: float ops
    clip: bool                           # the grid is narrower than the container
    axis: Optional[int]                  # channel axis (as the quantizer gives it) or None

    @property
    def form(self) -> str:
        if self.zero_point is None:
            return 'float ops (Div/Round/Clip/Mul)'
        kind = 'uint8' if self.zero_point.dtype == torch.uint8 else 'int8'
        gran = 'per-tensor' if self.scale.dim() == 0 else 'per-channel'
        return f'QDQ {kind} {gran}' + (' + Clip' if self.clip else '')


def _pick_zero_point(lo: torch.Tensor, hi: torch.Tensor, z: torch.Tensor, dtype, prefer):
    """A container zero point z' (per entry) with z' + lo ≥ c_min, z' + hi ≤ c_max, z' in the
    container, closest to ``prefer``; None when no such z' exists."""
    cmin, cmax = _container_range(dtype)
    low = torch.clamp(cmin - lo, min=cmin)
    high = torch.clamp(cmax - hi, max=cmax)
    if bool((low > high).any()):
        return None
    return torch.minimum(torch.maximum(prefer, low), high)


def uniform_plan(scale, zero_point, qmin: int, qmax: int, axis: Optional[int] = None,
                 weights: bool = False) -> _UniformPlan:
    """The 8-bit QDQ form of the grid x̂ = (clamp(⌊x/Δ⌉ + z, q_min, q_max) − z)·Δ.

    With an integral z the grid is clamp(⌊x/Δ⌉, q_min − z, q_max − z)·Δ, which any container
    zero point z' reproduces as long as [q_min − z + z', q_max − z + z'] fits the container:
    activations take uint8 (z' = z where possible; ORT's preferred U8 activations), weights int8
    with z' = 0 where possible (symmetric S8 weights), else the other container. Per-channel
    parameters whose entries are all equal become per-tensor.
    """
    scale = torch.as_tensor(scale).detach().to(torch.float32).cpu()
    z = torch.as_tensor(zero_point).detach().to(torch.float32).cpu()
    if z.numel() == 1 and scale.numel() > 1:
        z = z.reshape(()).expand(scale.shape).clone()
    if scale.dim() > 0 and scale.numel() > 0 and bool((scale == scale.reshape(-1)[0]).all()) \
            and bool((z == z.reshape(-1)[0]).all()):
        scale, z, axis = scale.reshape(-1)[0].clone(), z.reshape(-1)[0].clone(), None
    if scale.dim() == 0:
        axis = None
    if scale.dim() == 0 and z.dim() > 0:
        z = z.reshape(-1)[0].clone()
    lo_f, hi_f = (qmin - z), (qmax - z)
    plan = _UniformPlan(scale=scale, lo=lo_f, hi=hi_f, zero_point=None, clip=False, axis=axis)
    if not (is_integral(z) and bool((scale > 0).all()) and bool(torch.isfinite(scale).all())):
        return plan
    lo, hi, zi = lo_f.to(torch.int64), hi_f.to(torch.int64), z.to(torch.int64)
    order = (torch.int8, torch.uint8) if weights else (torch.uint8, torch.int8)
    for dtype in order:
        prefer = torch.zeros_like(zi) if (weights and dtype == torch.int8) else (
            zi if dtype == torch.uint8 else zi - 128)
        zp = _pick_zero_point(lo, hi, zi, dtype, prefer)
        if zp is None:
            continue
        cmin, cmax = _container_range(dtype)
        plan.zero_point = zp.to(dtype)
        plan.clip = not (bool((zp + lo == cmin).all()) and bool((zp + hi == cmax).all()))
        if plan.clip:
            # the clip bounds must round back to the grid ends exactly
            for end in (lo_f, hi_f):
                if not torch.equal(torch.round((end * scale) / scale), end):
                    plan.zero_point = None
                    return plan
        return plan
    return plan


def _as_const(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.device)


def apply_uniform_plan(plan: _UniformPlan, x: torch.Tensor) -> torch.Tensor:
    axis = None if plan.axis is None else plan.axis % x.dim()
    s = _as_const(plan.scale, x)
    if plan.zero_point is None:      # float ops, the order of ``fake_quant_chunked``
        sb = _bcast(s, x.dim(), axis)
        lo = _bcast(_as_const(plan.lo, x), x.dim(), axis)
        hi = _bcast(_as_const(plan.hi, x), x.dim(), axis)
        return torch.minimum(torch.maximum(torch.round(x / sb), lo), hi) * sb
    if plan.clip:
        lo = plan.lo * plan.scale
        hi = plan.hi * plan.scale
        if lo.dim() == 0:
            x = torch.clamp(x, float(lo), float(hi))
        else:
            x = torch.minimum(torch.maximum(x, _bcast(_as_const(lo, x), x.dim(), axis)),
                              _bcast(_as_const(hi, x), x.dim(), axis))
    return _QuantDequant.apply(x, s, _as_const(plan.zero_point, x), axis)


# ---------------------------------------------------------------------------------------------
# Exportable forwards of the quantizer families
# ---------------------------------------------------------------------------------------------
def _uniform_forward(q: UniformQuantizer):
    plan = uniform_plan(q.scale, q.zero_point, q.qmin, q.qmax, q.ch_axis)
    if plan.axis is not None:
        # Per-channel activations (AdaLog's per-head q/k/v, un-reparameterized channel-wise
        # inputs) feed MatMuls; onnxruntime 1.32 fuses DQ(per-axis) → MatMul into
        # MatMulIntegerToFloat and then fails at run time ("Per-Channel is not supported yet"),
        # so they are written as the equivalent float ops.
        plan.zero_point = None
    return (lambda x: apply_uniform_plan(plan, x)), plan.form


def _ptf_forward(q: PTFQuantizer):
    plan = uniform_plan(q.channel_scale, q.zero_point, q.qmin, q.qmax, q.ch_axis)
    return (lambda x: apply_uniform_plan(plan, x)), plan.form


def log_code_thresholds(code_of, bits: int) -> torch.Tensor:
    """``quantizers.log.log_code_thresholds``; a code that is not monotone is not exportable."""
    try:
        return _log_code_thresholds(code_of, bits)
    except ValueError as err:
        raise UnsupportedQuantizerError(str(err)) from None


def _log_table_forward(q: Quantizer, table: torch.Tensor, arg_fn, code_of, what: str):
    """Codes c = code_of(u), u = arg_fn(x), clamped to [0, 2^b] (2^b, NaN, +inf: the zero code);
    values = table[c] (table[2^b] = 0).

    ``code_of`` is the quantizer's own float32 formula (torch's log2). In the graph it becomes
    ``Log``, whose result can sit an ulp away from torch's; the code is then made exact with the
    thresholds of ``log_code_thresholds``: c = c₀ + [u < T[c₀]] − [u ≥ T[c₀ − 1]] (one Gather and
    a compare each way), so the graph returns torch's code for every u."""
    n = 2 ** q.bits
    thresholds = log_code_thresholds(code_of, q.bits)
    up = torch.cat([thresholds, torch.zeros(1)])                        # T[c], T[2^b] = 0
    down = torch.cat([torch.full((1,), float('inf')), thresholds])      # T[c − 1], T[−1] = ∞

    def forward(x):
        u = arg_fn(x)
        c = code_of(u)
        c = torch.where(torch.isnan(c), torch.full_like(c, float(n)), c)
        c = torch.clamp(c, 0.0, float(n))
        i = c.to(torch.int64)
        c = c + (u < up.to(x.device)[i]).to(c.dtype) - (u >= down.to(x.device)[i]).to(c.dtype)
        return table.to(x.device)[c.to(torch.int64)]
    return forward, f'standard ops ({what}: Log, Round, Gather, exact code thresholds)'


def _code_table(dequant, bits: int) -> torch.Tensor:
    codes = torch.arange(2 ** bits + 1, dtype=torch.int32)
    codes[-1] = -1                               # ZERO_CODE → 0
    return dequant(codes).to(torch.float32).detach()


def _log2_forward(q: Log2Quantizer):
    d = q.delta.detach().cpu()
    table = _code_table(lambda c: log2_dequantize(c, d), q.bits)
    dv = d.to(torch.float32)
    return _log_table_forward(q, table, lambda x: x / dv.to(x.device), log_code_of(0), 'log2')


def _log_sqrt2_forward(q: LogSqrt2Quantizer):
    d = q.delta.detach().cpu()
    table = _code_table(lambda c: log_sqrt2_dequantize(c, d), q.bits)
    dv = d.to(torch.float32)
    return _log_table_forward(q, table, lambda x: x / dv.to(x.device), log_code_of(1), 'log√2')


def _adalog_forward(q: AdaLogQuantizer):
    d = q.delta.detach().cpu().to(torch.float32)
    qv = float(int(q.q))
    table = _code_table(lambda c: adalog_dequantize(c, d, q.q.cpu(), q.r, q.lut.cpu(), q.bits,
                                                    q.shift, q.subtract_shift), q.bits)
    shift, r = q.shift, float(q.r)

    def arg(x):
        xs = x + shift if shift else x
        return xs / d.to(x.device)
    return _log_table_forward(q, table, arg, log_code_of(2, r, qv), 'AdaLog')


def _twin_softmax_forward(q: TwinUniformSoftmaxQuantizer):
    n = float(2 ** (q.bits - 1) - 1)
    s, d1, d2 = (float(t) for t in twin_softmax_steps(q.split_exp.cpu(), q.bits))

    def forward(x):
        small = torch.clamp(torch.round(x / d1), 0.0, n) * d1
        large = torch.clamp(torch.round(x / d2), 0.0, n) * d2
        return torch.where(x < s, small, large)
    return forward, 'standard ops (twin uniform: Where, Div, Round, Clip, Mul)'


def _twin_gelu_forward(q: TwinUniformGeluQuantizer):
    h = float(2 ** (q.bits - 1))
    d_neg, d_pos = (float(t) for t in twin_gelu_steps(q.pos_exp.cpu(), q.bits))

    def forward(x):
        neg = torch.clamp(torch.round(x / d_neg), -h, 0.0) * d_neg
        pos = torch.clamp(torch.round(x / d_pos), 0.0, h - 1) * d_pos
        return torch.where(x < 0, neg, pos)
    return forward, 'standard ops (twin uniform: Where, Div, Round, Clip, Mul)'


def _pow2_table(lo: int, hi: int, device=None) -> torch.Tensor:
    """[2^lo, …, 2^hi] in float64, exactly (ldexp)."""
    return torch.tensor([math.ldexp(1.0, e) for e in range(lo, hi + 1)], dtype=torch.float64,
                        device=device)


def _exp2_int(k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """2^k for integer-valued float64 k in [lo, hi], exactly: a Gather from the table of those
    powers (onnxruntime's Pow is not exact for every integer exponent)."""
    return _pow2_table(lo, hi, k.device)[(k - lo).to(torch.int64)]


def _floor_log2(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """clamp(⌊log2 v⌋, lo, hi) for positive float64 v, exactly: Log's estimate (within one of
    the floor) corrected by comparing v with exact powers of two from a table."""
    table = _pow2_table(lo, hi + 1, v.device)                     # 2^lo … 2^(hi+1)
    k = torch.clamp(torch.floor(torch.log2(v)), float(lo), float(hi))
    i = (k - lo).to(torch.int64)
    up = (v >= table[i + 1]) & (k < hi)
    down = (v < table[i]) & (k > lo)
    return k + up.to(torch.float64) - down.to(torch.float64)


def lis_exp_table(q: LogIntSoftmax, n_tok: int) -> torch.Tensor:
    """T[d] = z(d)·2^(Q − q(d)) (float64) for d = max − x_int over the logit code range: the
    row-relative integer exps of ``LogIntSoftmax`` (see its fast path); exact while
    (2·n_tok + 1)·max T < 2^53, else an error."""
    lq = q.logit_quant
    scale = float(lq.scale)
    d = torch.arange(lq.qmax - lq.qmin + 1, dtype=torch.int64)
    z, qq, _ = int_exp_parts(-d, scale, q.n)
    q_top = int(qq.max())
    if int(z.max()) * 2 ** q_top * (2 * n_tok + 1) >= 2 ** 53:
        raise UnsupportedQuantizerError(
            f'{q.qname}: Log-Int-Softmax exps exceed float64 integers at {n_tok} tokens '
            f'(logit scale {scale:g}); not exportable exactly')
    return torch.bitwise_left_shift(z, q_top - qq).to(torch.float64)


def _lis_forward(q: LogIntSoftmax):
    lq = q.logit_quant
    if lq.scale.numel() != 1 or not is_integral(lq.zero_point):
        raise UnsupportedQuantizerError(f'{q.qname}: Log-Int-Softmax export needs a per-tensor '
                                        'logit quantizer with an integral zero point')
    s = lq.scale.detach().cpu().reshape(()).to(torch.float32)
    zp = float(lq.zero_point)
    lo, hi = lq.qmin - zp, lq.qmax - zp
    n_top = 2 ** q.bits
    top = float(n_top)
    tables = {}

    def forward(x):
        n_tok = x.shape[-1]
        key = int(n_tok)
        if key not in tables:
            tables[key] = lis_exp_table(q, key)
        T = tables[key].to(x.device)
        c = torch.clamp(torch.round(x / s.to(x.device)), lo, hi)        # logit codes − z
        d = (c.amax(dim=-1, keepdim=True) - c).to(torch.int64)
        t = T[d]
        tot = t.sum(dim=-1, keepdim=True)
        pos = t > 0
        r = torch.round(tot / torch.where(pos, t, torch.ones_like(t)))  # R = ⌊Σe/e⌉, ties to even
        k = _floor_log2(r / 0.75, 0, n_top)                        # half-up log2 code of R
        keep = pos & (k < top)
        val = torch.where(keep, _exp2_int(-torch.where(keep, k, torch.zeros_like(k)), 1 - n_top, 0),
                          torch.zeros_like(k))
        return val.to(torch.float32)
    return forward, 'standard ops (Log-Int-Softmax: Round, ReduceMax, Gather, float64 Div/Round, Log)'


_FORWARDS = {UniformQuantizer: _uniform_forward, PTFQuantizer: _ptf_forward,
             LogIntSoftmax: _lis_forward, Log2Quantizer: _log2_forward,
             LogSqrt2Quantizer: _log_sqrt2_forward, AdaLogQuantizer: _adalog_forward,
             TwinUniformSoftmaxQuantizer: _twin_softmax_forward,
             TwinUniformGeluQuantizer: _twin_gelu_forward}


# ---------------------------------------------------------------------------------------------
# FQ-ViT integer LayerNorm as float64 ops on exact integers
# ---------------------------------------------------------------------------------------------
def int_layernorm_onnx(x, iv, weight, bias, oq, eps: float, dyadic_bits: int = 8):
    """``int_layernorm_fake_quant`` (fold_mean=True) written with exportable ops.

    ``iv``: the ``IntegerInput`` view of the input quantizer; ``oq``: the per-tensor output
    quantizer. Every float64 step repeats ``int_layernorm_reference``'s expression in the same
    order; integers stay exact below 2^53.
    """
    dev = x.device
    C = int(x.shape[-1])          # a constant of the graph (a traced size would compute in float32)
    s_in = iv.channel_scale.detach().to(torch.float32).reshape(-1).to(dev)
    zp_in = float(iv.zero_point)
    factor = torch.pow(2.0, iv.alpha.detach().to(torch.float64)).reshape(-1).to(dev)
    delta1 = float(iv.base_scale)
    delta_out = float(oq.scale)
    gamma = (torch.ones(C, dtype=torch.float64) if weight is None
             else weight.detach().to(torch.float64)).to(dev)
    beta = (torch.zeros(C, dtype=torch.float64) if bias is None
            else bias.detach().to(torch.float64)).to(dev)
    gamma_abs = gamma.abs()
    sign = torch.where(gamma < 0, -1.0, 1.0).to(torch.float64)
    z_out = float(torch.round(oq.zero_point.detach()).reshape(()))
    lo_out, hi_out = 0.0 - z_out, (2 ** oq.bits - 1) - z_out

    codes = torch.clamp(torch.round(x / s_in), 0.0 - zp_in, iv.qmax - zp_in)
    xc = codes.to(torch.float64) * factor                      # (q − z)·2^α, units of Δ_1
    s1 = xc.sum(dim=-1, keepdim=True)
    s2 = (xc * xc).sum(dim=-1, keepdim=True)
    # float64 constants as float64 tensors (the exporter writes a bare Python float as float32)
    def f64(v):
        return torch.tensor(v, dtype=torch.float64, device=dev)
    d = s2 * f64(float(C)) - s1 * s1
    sigma = f64(delta1 / C) * torch.sqrt(d + f64(eps * C * C / (delta1 * delta1)))
    mu = (s1 * f64(delta1)) / f64(float(C))
    abs_a = (f64(delta1) / sigma) * gamma_abs / f64(delta_out)
    # only ⌊log2|A|⌋ in [dyadic_bits − 32, dyadic_bits − 1] matters: N is clamped to [0, 31]
    f = _floor_log2(torch.clamp(abs_a, min=torch.finfo(torch.float64).tiny), dyadic_bits - 32,
                    dyadic_bits - 1)
    n = torch.clamp((dyadic_bits - 1) - f, 0.0, 31.0)
    two_n = _exp2_int(n, 0, 31)
    m = torch.clamp(torch.floor(abs_a * two_n), 0.0, float(2 ** dyadic_bits - 1)) * sign
    b = torch.round((beta - mu / sigma * gamma) / f64(delta_out) * two_n)
    y = torch.round((m * xc + b) / two_n)
    y = torch.clamp(y, lo_out, hi_out).to(torch.float32)
    return y * oq.scale.detach().to(torch.float32).reshape(()).to(dev)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
def weight_codes(wq: Quantizer, weight: torch.Tensor):
    """(codes, scale, zero_point, axis, form) for a uniform weight quantizer, or None when the
    grid fits no 8-bit container (the caller then stores the fake-quantized float weight)."""
    if type(wq) is not UniformQuantizer:
        return None
    w = weight.detach()
    plan = uniform_plan(wq.scale, wq.zero_point, wq.qmin, wq.qmax, wq.ch_axis, weights=True)
    if plan.zero_point is None:
        return None
    axis = None if plan.axis is None else plan.axis % w.dim()
    q = wq.quantize(w).to(torch.int64).cpu()                     # clamp(⌊w/Δ⌉ + z, q_min, q_max)
    z = broadcast_param(wq.zero_point.detach().cpu().to(torch.float32), q, wq.ch_axis)
    zp = plan.zero_point
    codes = q - z.to(torch.int64) + _bcast(zp.to(torch.int64), w.dim(), axis)
    cmin, cmax = _container_range(zp.dtype)
    if int(codes.min()) < cmin or int(codes.max()) > cmax:
        return None
    return codes.to(zp.dtype), plan.scale, zp, axis, plan.form.replace('QDQ', 'DQ').replace(' + Clip', '')


def _linear_forward(mod: QuantLinear, report: ExportReport, name: str):
    wq = mod.w_quantizer
    packed = weight_codes(wq, mod.weight) if (wq is not None and wq.mode == 'quant') else None
    if packed is not None:
        codes, scale, zp, axis, form = packed
        codes_t = codes.t().contiguous()                        # [in, out]: MatMul(x, W^T)
        axis_t = None if axis is None else 1 - axis
        report.weights[name] = form
    else:
        w_t = mod.quant_weight().detach().t().contiguous()
        report.weights[name] = 'float' if wq is None or wq.mode != 'quant' else 'float (fake-quant values)'
    bias = None if mod.bias is None else mod.bias.detach()

    def forward(x):
        if mod.in_quantizer is not None:
            x = mod.in_quantizer(x)
        if packed is not None:
            w = _Dequant.apply(codes_t.to(x.device), scale.to(x.device), zp.to(x.device), axis_t)
        else:
            w = w_t.to(x.device)
        y = torch.matmul(x, w)
        if bias is not None:
            y = y + bias.to(x.device)
        return y if mod.out_quantizer is None else mod.out_quantizer(y)
    return forward


def _conv_forward(mod: QuantConv2d, report: ExportReport, name: str):
    wq = mod.w_quantizer
    packed = weight_codes(wq, mod.weight) if (wq is not None and wq.mode == 'quant') else None
    if packed is not None:
        report.weights[name] = packed[4]
    else:
        w_float = mod.quant_weight().detach()
        report.weights[name] = 'float' if wq is None or wq.mode != 'quant' else 'float (fake-quant values)'
    if mod.padding_mode != 'zeros':
        raise UnsupportedQuantizerError(f'{name}: padding_mode {mod.padding_mode!r} is not exported')

    def forward(x):
        if mod.in_quantizer is not None:
            x = mod.in_quantizer(x)
        if packed is not None:
            codes, scale, zp, axis, _ = packed
            w = _Dequant.apply(codes.to(x.device), scale.to(x.device), zp.to(x.device), axis)
        else:
            w = w_float.to(x.device)
        y = F.conv2d(x, w, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
        return y if mod.out_quantizer is None else mod.out_quantizer(y)
    return forward


def _layernorm_forward(mod: QuantLayerNorm, report: ExportReport, name: str):
    pair = mod._integer_pair()
    if pair is None:
        report.layernorms[name] = 'LayerNormalization (float)'

        def forward(x):
            if mod.in_quantizer is not None:
                x = mod.in_quantizer(x)
            y = F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
            return y if mod.out_quantizer is None else mod.out_quantizer(y)
        return forward
    iv, oq = pair
    report.layernorms[name] = 'integer LayerNorm (float64 exact-integer ops) + output QDQ'
    requantize = oq is mod.out_quantizer     # else the downstream module applies ``oq`` itself

    def forward(x):
        y = int_layernorm_onnx(x, iv, mod.weight, mod.bias, oq, mod.eps)
        return oq(y) if requantize else y    # on oq's grid already: the QDQ is exact
    return forward


# ---------------------------------------------------------------------------------------------
# Integer-exact arithmetic (``fqvit_det.nn.exact``): GEMMs on codes, as the integer model
# ---------------------------------------------------------------------------------------------
class _QuantizeCodes(torch.autograd.Function):
    """QuantizeLinear: the container codes clamp(⌊x/Δ⌉ + z', c_min, c_max) (``zero_point``'s dtype)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        cmin, cmax = _container_range(zero_point.dtype)
        return torch.clamp(torch.round(x / scale) + zero_point.to(torch.float32), cmin, cmax
                           ).to(zero_point.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op('QuantizeLinear', x, scale, zero_point)


class _MatMulInteger(torch.autograd.Function):
    """MatMulInteger: int32 Σ_k (a − z_a)(b − z_b), exact (b_zero_point per tensor or per column)."""

    @staticmethod
    def forward(ctx, a, b, a_zero_point, b_zero_point):
        af = a.to(torch.float64) - a_zero_point.to(torch.float64)
        bf = b.to(torch.float64) - b_zero_point.to(torch.float64)
        return torch.matmul(af, bf).to(torch.int32)

    @staticmethod
    def symbolic(g, a, b, a_zero_point, b_zero_point):
        return g.op('MatMulInteger', a, b, a_zero_point, b_zero_point)


def _integer_weight(wc: torch.Tensor):
    """(B [K, N], b_zero_point) for MatMulInteger from centred weight codes wc [N, K] (float64):
    int8 with zero point 0 when they fit, else uint8 codes with a per-column zero point."""
    wc = wc.reshape(wc.shape[0], -1).to(torch.int64)
    if int(wc.min()) >= -128 and int(wc.max()) <= 127:
        return wc.t().contiguous().to(torch.int8), torch.zeros((), dtype=torch.int8)
    zp = torch.clamp(-wc.amin(dim=1), min=0)
    if int((wc + zp[:, None]).max()) > 255 or int(zp.max()) > 255:
        return None
    return (wc + zp[:, None]).t().contiguous().to(torch.uint8), zp.to(torch.uint8)


def _exact_linear_forward(mod, report: ExportReport, name: str, patch=False):
    """The integer-exact forward of a quantized Linear (or of a patch convolution, ``patch``) in
    ONNX, or None where the layer does not compute exactly. Its GEMM, by input grid:

    * per-tensor uniform: codes by ``QuantizeLinear`` (after the grid's Clip), then
      ``MatMulInteger`` with the input and weight zero points → int32, ``Cast`` to float32,
      ``Mul`` Δ_x·Δ_w[c], ``Add`` bias: the ops of ``QuantLinear``'s exact branch and of
      ``IntegerLinear`` (requant='float'), in their order;
    * twin uniform (PTQ4ViT after GELU): the negative and positive levels as two uint8
      ``MatMulInteger`` (negative levels negated), joined in float64 with their steps in units of
      the finer one (exact powers of two);
    * otherwise (weight codes that fit no 8-bit operand): the codes in the input step and a float64
      ``MatMul`` (every partial sum an integer below 2^53).
    """
    from ..nn.exact import exact_linear_constants
    from ..quantizers.twin import twin_gelu_levels
    with torch.no_grad():
        unit = mod._exact_step()
        if unit is None:
            return None
        wc, acc_scale = exact_linear_constants(mod, unit)
    iq = mod._exact[0]
    bias = None if mod.bias is None else mod.bias.detach().to(torch.float32)
    weight = _integer_weight(wc)
    kind = 'float64'
    if weight is not None and type(iq) is UniformQuantizer:
        plan = uniform_plan(iq.scale, iq.zero_point, iq.qmin, iq.qmax, None)
        if plan.zero_point is not None and plan.scale.dim() == 0:
            kind = 'uniform'
    elif weight is not None and isinstance(iq, TwinUniformGeluQuantizer) and iq.bits <= 8:
        kind = 'twin'
        d_neg, d_pos = (float(t) for t in twin_gelu_steps(iq.pos_exp.cpu(), iq.bits))
        h, r_neg, r_pos = float(2 ** (iq.bits - 1)), -d_neg / float(unit), d_pos / float(unit)
    report.weights[name] = {
        'uniform': 'integer (MatMulInteger, exact rescale)',
        'twin': 'integer (two MatMulInteger for the twin-uniform input, exact rescale)',
        'float64': 'integer-valued float64 MatMul (exact)'}[kind]
    if kind == 'float64':
        w64 = wc.reshape(wc.shape[0], -1).t().contiguous()
    else:
        b, b_zp = weight
    unit32 = unit.detach().to(torch.float32).reshape(())

    def mm_int(a, a_zp, x):
        return _MatMulInteger.apply(a, b.to(x.device), a_zp.to(x.device), b_zp.to(x.device))

    def gemm(x):                                            # [..., K] → float32 [..., N]
        if kind == 'uniform':
            if plan.clip:
                x = torch.clamp(x, float(plan.lo * plan.scale), float(plan.hi * plan.scale))
            a = _QuantizeCodes.apply(x, plan.scale.to(x.device), plan.zero_point.to(x.device))
            acc = mm_int(a, plan.zero_point, x).to(torch.float32)
        elif kind == 'twin':
            neg, pos = twin_gelu_levels(x, d_neg, d_pos, h)
            z8 = torch.zeros((), dtype=torch.uint8)
            acc = (mm_int((-neg).to(torch.uint8), z8, x).to(torch.float64) * r_neg
                   + mm_int(pos.to(torch.uint8), z8, x).to(torch.float64) * r_pos)
            acc = acc.to(torch.float32)
        else:
            xc = torch.round(x / unit32.to(x.device)).to(torch.float64)
            acc = torch.matmul(xc, w64.to(x.device)).to(torch.float32)
        y = acc * acc_scale.to(x.device)
        return y if bias is None else y + bias.to(x.device)

    # float64 on the fake-quantized input values, on its grid
    prepare = mod.in_quantizer if kind == 'float64' else None
    return _gemm_layer_forward(mod, gemm, patch, prepare)


def _gemm_layer_forward(mod, gemm, patch: bool, prepare=None):
    """forward(x) of a Linear, or of a patch convolution (``patch``: the patches as rows), whose
    GEMM and bias are ``gemm`` ([..., K] → float32 [..., N]), then the output quantizer;
    ``prepare`` (optional) maps the input first."""
    from ..integer.linear import patch_rows

    def forward(x):
        if prepare is not None:
            x = prepare(x)
        if not patch:
            y = gemm(x)
        else:
            rows, (gh, gw) = patch_rows(x, mod.kernel_size)
            y = gemm(rows).transpose(1, 2).reshape(-1, mod.out_channels, gh, gw)
        return y if mod.out_quantizer is None else mod.out_quantizer(y)
    return forward


def _float64_input_forward(mod, report: ExportReport, name: str, patch=False):
    """The exact arithmetic's forward of a quantized Linear / patch convolution whose input stays
    float (``nn.exact.float_input_layer``): ``Cast`` to float64, ``MatMul`` with the dequantized
    weight as a float64 initializer, ``Cast`` to float32, ``Add`` bias; None where it does not
    apply. Products of float32 values are exact in float64, so the float32 result does not depend
    on onnxruntime's summation order (see ``nn.exact``)."""
    from ..nn.exact import float64_gemm_on
    with torch.no_grad():
        if not float64_gemm_on(mod):
            return None
        w64 = mod.quant_weight().detach().reshape(mod.weight.shape[0], -1).t().contiguous().double()
    bias = None if mod.bias is None else mod.bias.detach().to(torch.float32)
    report.weights[name] = 'float64 MatMul (float input, dequantized weight)'

    def gemm(x):
        y = torch.matmul(x.to(torch.float64), w64.to(x.device)).to(torch.float32)
        return y if bias is None else y + bias.to(x.device)
    return _gemm_layer_forward(mod, gemm, patch)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def check_exportable(model: nn.Module) -> None:
    """Raise ``UnsupportedQuantizerError`` naming the first quantizer in 'quant' mode that has no
    ONNX form, or one still observing (calibrate or load a state first)."""
    for name, q in model.named_modules():
        if not isinstance(q, Quantizer):
            continue
        if q.mode == 'observe':
            raise UnsupportedQuantizerError(f'{name or q.qname}: quantizer is still in observe mode; '
                                            'calibrate (or load a quant state) before exporting')
        if q.mode == 'quant' and type(q) not in _FORWARDS:
            raise UnsupportedQuantizerError(
                f'{name or q.qname}: quantizer type {type(q).__name__} has no ONNX export; '
                f'supported: {sorted(c.__name__ for c in _FORWARDS)}')


ARITHMETIC = ('float', 'exact')
# the exact export's quantized layers on float inputs (PTQ4ViT's patch embedding): float64 GEMMs,
# whose float32 results onnxruntime reproduces whatever its summation order (nn.exact)
EXACT_FLOAT_INPUT_GEMM = 'float64'


@contextlib.contextmanager
def export_forwards(model: nn.Module, report: Optional[ExportReport] = None,
                    arithmetic: str = 'float'):
    """Within the context every quantizer in 'quant' mode, quantized Linear / Conv and quantized
    LayerNorm of ``model`` runs its exportable forward (instance attribute ``forward``); the
    originals are restored on exit.

    ``arithmetic='exact'``: the model computes as its integer-exact simulation
    (``set_exact_arithmetic`` with ``float_input_gemm='float64'``, switched on for the context)
    and its GEMMs are written on codes:
    ``MatMulInteger`` for Linears / patch convolutions on per-tensor uniform inputs, integer-valued
    float32 / float64 ``MatMul`` for QKᵀ and P·V (exact in any summation order), a float64
    ``MatMul`` for a quantized layer on a float input (PTQ4ViT's patch embedding), GELU as
    ``rational_gelu``'s float32 +, −, ×, ÷ (the same bits in any IEEE backend)."""
    from ..nn.exact import exact_arithmetic
    if arithmetic not in ARITHMETIC:
        raise ValueError(f'export: arithmetic must be one of {ARITHMETIC}, got {arithmetic!r}')
    check_exportable(model)
    report = report if report is not None else ExportReport()
    patched: List[nn.Module] = []
    with (exact_arithmetic(model, float_input_gemm=EXACT_FLOAT_INPUT_GEMM) if arithmetic == 'exact'
          else contextlib.nullcontext()):
        # weight quantizers are written with their module (int8 initializers + DequantizeLinear);
        # LIS drives its logit quantizer itself
        inner = {id(m.w_quantizer) for m in model.modules()
                 if isinstance(m, (QuantLinear, QuantConv2d)) and m.w_quantizer is not None}
        inner |= {id(m.logit_quant) for m in model.modules() if isinstance(m, LogIntSoftmax)}
        try:
            for name, mod in model.named_modules():
                if id(mod) in inner:
                    continue
                fwd = _export_forward(mod, report, name, arithmetic)
                if fwd is not None:
                    mod.forward = fwd
                    patched.append(mod)
            yield report
        finally:
            for mod in patched:
                del mod.forward


def _export_forward(mod: nn.Module, report: ExportReport, name: str, arithmetic: str):
    """The exportable forward of one module (None: it exports as it is)."""
    from ..integer.linear import IntegerPatchEmbed
    exact = arithmetic == 'exact'
    if isinstance(mod, Quantizer) and mod.mode == 'quant':
        fwd, report.quantizers[name] = _FORWARDS[type(mod)](mod)
        return fwd
    if isinstance(mod, QuantLinear):
        return ((exact and (_float64_input_forward(mod, report, name)
                            or _exact_linear_forward(mod, report, name)))
                or _linear_forward(mod, report, name))
    if isinstance(mod, QuantConv2d):
        return ((exact and IntegerPatchEmbed.supports(mod)
                 and (_float64_input_forward(mod, report, name, patch=True)
                      or _exact_linear_forward(mod, report, name, patch=True)))
                or _conv_forward(mod, report, name))
    if isinstance(mod, QuantLayerNorm):
        return _layernorm_forward(mod, report, name)
    return None


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                input_name: str = 'input', output_name: str = 'logits',
                arithmetic: str = 'float') -> ExportReport:
    """Export ``model`` (calibrated, quantizers in 'quant' mode; or float) to ONNX at ``path``.

    ``arithmetic``: ``'float'`` (default) writes the float32 simulation (QDQ around float MatMuls,
    which onnxruntime fuses into its integer kernels); ``'exact'`` writes the integer-exact
    simulation (``export_forwards``), the arithmetic of the integer model except for quantized
    layers on float inputs, which it computes in float64.

    Returns an ``ExportReport``: how every quantizer, weight and LayerNorm was written, and the
    op counts of the written graph.
    """
    import onnx
    if arithmetic not in ARITHMETIC:
        raise ValueError(f'export_onnx: arithmetic must be one of {ARITHMETIC}, got {arithmetic!r}')
    if opset < 13:
        raise ValueError(f'export_onnx: opset must be >= 13 (per-axis QuantizeLinear), got {opset}')
    report = ExportReport(path=str(path), opset=opset)
    was_training = model.training
    model.eval()
    try:
        with export_forwards(model, report, arithmetic), torch.no_grad(), \
                warnings.catch_warnings():
            # the calibrated parameters are meant to become constants of the graph
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            warnings.simplefilter('ignore', DeprecationWarning)   # the TorchScript exporter
            torch.onnx.export(model, (example_input,), str(path), dynamo=False,
                              opset_version=opset, input_names=[input_name],
                              output_names=[output_name], do_constant_folding=True,
                              dynamic_axes=({input_name: {0: 'batch'}, output_name: {0: 'batch'}}
                                            if dynamic_batch else None))
    finally:
        model.train(was_training)
    graph = onnx.load(str(path), load_external_data=False).graph
    report.op_counts = dict(sorted(Counter(n.op_type for n in graph.node).items()))
    return report
