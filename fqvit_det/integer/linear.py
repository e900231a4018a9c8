"""Integer Linear / patch-embedding convolution: int8 × int8 → int32 GEMM with an int32 bias.

One module serves every calibrated ``QuantLinear`` whose input has a per-tensor uniform quantizer
(or PTQ4ViT's twin-uniform post-GELU quantizer) and whose weight has a uniform quantizer
(per-channel or per-tensor, symmetric or asymmetric):

* input codes a (uint8 for unsigned quantizers, int8 for signed ones) are produced from the float
  input exactly as the simulated quantizer does (⌊x/Δ_x⌉ + z_x, clamped);
* weight codes b = q_w − z_w (int8, precomputed once, stored (N, K) so that ``b.t()`` is the K×N
  operand ``torch._int_mm`` reads) — when q_w − z_w does not fit int8 (asymmetric 8-bit weights),
  b = q_w − 128 and the per-channel offset o = 128 − z_w is carried separately;
* acc = Σ_k (a_k − z_x)(b_k + o) = a·b − z_x·Σb − z_x·o·K + o·Σa, where every term but o·Σa is a
  per-output-channel int32 constant folded into ``bias_int``; the bias itself enters dyadic
  outputs in output units with N fraction bits (int64 ``bias_out``) and float outputs as the
  float bias after the rescale (an int32 bias in units of Δ_x·Δ_w moves outputs by up to half a
  unit: enough to flip 4-bit codes).

Output, per role (``out_mode``):

==============  ======================================================  =====================
out_mode        computes                                                used for
==============  ======================================================  =====================
``'float'``     y = acc · (Δ_x·Δ_w[c]) + bias (float32: an exact       outputs the method
                rescale of the int32 accumulator, the float bias added  keeps float: fc1
                after it as the simulation adds it)                     (→ GELU), every Linear
                                                                        of PTQ4ViT / RepQ /
                                                                        AdaLog (→ residual)
``'dyadic'``    codes = clamp(⌊acc·M[c]·2^−N⌉ + z_out), M[c]·2^−N ≈    outputs the preset
                Δ_x·Δ_w[c]/Δ_out (31-bit M, int64 product): the next    quantizes per tensor
                quantizer's codes, at most one code from the            (FQ-ViT qkv, proj, fc2,
                simulation's; returned dequantized ((q − z_out)·Δ_out)  patch embedding, head)
                for the float parts downstream
``'requant'``   codes = clamp(⌊y/Δ_out⌉ + z_out) with y the ``'float'``     the same outputs, by
                value: the next quantizer's own rounding of the          default (``to_integer``
                float32 rescale, bit-identical to the integer-exact      ``requant='float'``)
                simulation (``fqvit_det.nn.exact``)
==============  ======================================================  =====================

Twin-uniform inputs (PTQ4ViT post-GELU, Δ_pos = 2^m·Δ_neg): the codes split into a positive and a
negative int8 operand (levels 0 … h − 1 and −h … 0), stacked on the rows of one ``_int_mm``; the
two accumulators meet in the finer unit by an exact left shift (int64), so the sum stays integer.
"""
import math
from typing import Optional

import torch
from torch import nn

from ..nn.modules import is_patch_conv
from . import kernels

INT8_MIN, INT8_MAX = -128, 127
MULT_BITS = 31


# --- elementwise kernels around the GEMM (eager; ``use_compiled_kernels`` fuses each into one loop)
def _quantize_input(x, scale, z: int, qmin: int, qmax: int, dtype):
    """clamp(⌊x/Δ⌉ + z, q_min, q_max) as ``dtype``: the simulated quantizer's codes."""
    c = torch.div(x, scale)                        # a new tensor: the rest runs in place
    return c.round_().add_(z).clamp_(qmin, qmax).to(dtype)


def _rescale(acc, bias_int, acc_scale, bias_float, in_place: bool = False):
    """(acc + zero-point terms)·Δ_x·Δ_w[c] + bias in float32 (the bias stays float here: in
    units of Δ_x·Δ_w its rounding would move 4-bit outputs by up to half a unit)."""
    y = torch.add(acc, bias_int).to(torch.float32)
    return y.mul_(acc_scale).add_(bias_float)


def _requantize_dequantize(acc, bias_int, multiplier, bias_out, rnd: int, shift: int, zo, qmin: int,
                           qmax: int, out_scale):
    """(clamp(⌊((acc + z terms)·M + B)·2^−N⌉ + z_out) − z_out)·Δ_out: the next quantizer's values,
    B = ⌊bias·2^N/Δ_out⌉ the bias in output units with N fraction bits."""
    q = ((acc + bias_int).to(torch.int64) * multiplier + bias_out + rnd) >> shift
    return (torch.clamp(q + zo, qmin, qmax) - zo).to(torch.float32) * out_scale


def _requantize_float(y, out_scale, zo: int, qmin: int, qmax: int):
    """(clamp(⌊y/Δ_out⌉ + z_out) − z_out)·Δ_out: the next quantizer's fake quantization of y."""
    q = torch.div(y, out_scale)
    return q.round_().add_(zo).clamp_(qmin, qmax).sub_(zo).mul_(out_scale)


def _rescale_requantize(acc, bias_int, acc_scale, bias_float, out_scale, zo: int, qmin: int,
                        qmax: int, codes: bool, in_place: bool = False):
    """``_rescale`` then the next quantizer: its fake quantization, or (``codes``) its codes
    (``in_place``: ``acc`` may be overwritten; the compiled kernels use that, these do not)."""
    y = _rescale(acc, bias_int, acc_scale, bias_float)
    if codes:
        return _quantize_input(y, out_scale, zo, qmin, qmax, torch.int32)
    return _requantize_float(y, out_scale, zo, qmin, qmax)


EAGER = dict(quantize=_quantize_input, rescale=_rescale, requantize=_requantize_dequantize,
             rescale_requantize=_rescale_requantize)


# --- the same kernels as one compiled loop each (``kernels.py``; bit-identical), where built
def _native_ops(t: torch.Tensor, dtype: torch.dtype):
    if t.device.type != 'cpu' or t.dtype != dtype:
        return None
    from . import kernels
    return kernels.native()


def _quantize_native(x, scale, z: int, qmin: int, qmax: int, dtype):
    ops = _native_ops(x, torch.float32)
    if ops is None or torch.as_tensor(scale).numel() != 1:
        return _quantize_input(x, scale, z, qmin, qmax, dtype)
    return ops.quantize(x.contiguous(), float(scale), z, qmin, qmax, dtype)


def _rescale_native(acc, bias_int, acc_scale, bias_float, in_place: bool = False):
    ops = _native_ops(acc, torch.int32)
    if ops is None or acc.dim() != 2:
        return _rescale(acc, bias_int, acc_scale, bias_float)
    # in_place: the caller's fresh accumulator becomes the result (one allocation, not two)
    op = ops.rescale_ if in_place else ops.rescale
    return op(acc.contiguous(), bias_int, acc_scale, bias_float, 0, 1.0, 0, 0, 0)


def _rescale_requantize_native(acc, bias_int, acc_scale, bias_float, out_scale, zo: int, qmin: int,
                               qmax: int, codes: bool, in_place: bool = False):
    ops = _native_ops(acc, torch.int32)
    if ops is None or acc.dim() != 2:
        return _rescale_requantize(acc, bias_int, acc_scale, bias_float, out_scale, zo, qmin, qmax,
                                   codes)
    op = ops.rescale_ if in_place else ops.rescale
    return op(acc.contiguous(), bias_int, acc_scale, bias_float, 2 if codes else 1,
              float(out_scale), zo, qmin, qmax)


def twin_operand_rows(x: torch.Tensor, d_neg, d_pos, h: int) -> torch.Tensor:
    """Rows [positive levels; negative levels] (int8) of x on PTQ4ViT's post-GELU twin grid:
    the two operands of an integer GEMM on twin-uniform inputs (compiled where it applies)."""
    from ..quantizers.twin import twin_gelu_levels
    ops = _native_ops(x, torch.float32) if x.dim() == 2 else None
    if ops is not None:       # the same levels in one compiled pass
        return ops.twin_operands(x.contiguous(), float(d_neg), float(d_pos), h)
    neg, pos = twin_gelu_levels(x, d_neg, d_pos, h)
    return torch.cat([pos, neg], 0).to(torch.int8)


NATIVE = dict(quantize=_quantize_native, rescale=_rescale_native,
              requantize=_requantize_dequantize, rescale_requantize=_rescale_requantize_native)
KERNELS = dict(NATIVE)
OUT_MODES = ('float', 'dyadic', 'requant')
TWIN_ROWS = 1024          # rows per block of the compiled twin-uniform path


def use_compiled_kernels(enabled: bool = True) -> None:
    """Fuse the elementwise kernels with ``torch.compile`` (dynamic shapes; results identical to
    eager, checked by ``benchmarks/integer_speed.py``); ``False`` restores the default (the
    compiled C++ kernels of ``kernels.py`` where they build, else eager torch ops)."""
    if enabled:
        KERNELS.update({k: torch.compile(f, dynamic=True) for k, f in EAGER.items()})
    else:
        KERNELS.update(NATIVE)


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int32 = a (M×K, int8 or uint8 on CPU) @ b_t (K×N int8), the backend's integer GEMM.

    CPU: AMX tiles where ``kernels.amx_ops()`` says so (``b_t`` packed once and kept on the
    tensor, refreshed when its version changes), else oneDNN's VNNI GEMM; uint8 or int8
    activations of any shape. CUDA's kernel needs int8, M > 16 and K, N multiples of 8: other
    cases go through an exact int32-in-float64 matmul (every partial sum of int8 products below
    2^53)."""
    if a.device.type == 'cpu':
        tiles = tile_product(a, b_t)
        if tiles is None:
            return torch._int_mm(a, b_t)
        ops, packed = tiles
        return ops.amx_mm(a, packed, b_t.shape[1])
    M, K = a.shape
    N = b_t.shape[1]
    if a.dtype == torch.int8 and M > 16 and K % 8 == 0 and N % 8 == 0:
        return torch._int_mm(a, b_t)
    return (a.to(torch.float64) @ b_t.to(torch.float64)).to(torch.int32)


def tile_product(a: torch.Tensor, b_t: torch.Tensor):
    """(compiled ops, packed b_t) where a @ b_t runs on AMX tiles (``kernels.amx_ops()``; CPU,
    2-D int8 / uint8 a, int8 b_t), else None. The packed weight is kept on ``b_t`` and refreshed
    when its version changes. The ``tiles_*`` ops take (a, packed, N) in place of the int32
    product and compute it block by block inside their epilogue."""
    if a.device.type != 'cpu' or a.dim() != 2 or b_t.dtype != torch.int8 \
            or a.dtype not in (torch.int8, torch.uint8):
        return None
    ops = kernels.amx_ops()
    if ops is None:
        return None
    key = kernels.args_key(b_t)
    cached = getattr(b_t, '_fqvit_amx', None)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, ops.amx_pack(b_t))
        b_t._fqvit_amx = cached
    return ops, cached[1]


def dyadic(real: torch.Tensor, bits: int = MULT_BITS):
    """(M, N) with M·2^−N ≈ real (> 0), one shared N for all entries: M < 2^bits (int64)."""
    real = real.double()
    top = float(real.max())
    if not (top > 0 and math.isfinite(top)):
        raise ValueError(f'dyadic multiplier needs positive finite scales, got max {top}')
    shift = bits - 1 - math.floor(math.log2(top))
    shift = max(0, min(shift, 62))   # M < 2^bits, |acc| < 2^31: the product stays inside int64
    mult = torch.round(real * 2.0 ** shift).to(torch.int64).clamp(max=2 ** bits - 1)
    return mult, shift


def _per_channel(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.detach().reshape(-1).to(torch.float32)
    return t.expand(n).clone() if t.numel() == 1 else t.clone()


def weight_codes(w_quantizer, weight: torch.Tensor):
    """(b int8 [N, K], offset int32 [N] or None, Δ_w float32 [N]) for a uniform weight quantizer
    with per-tensor or per-output-channel (ch_axis 0) parameters."""
    w2 = weight.detach().reshape(weight.shape[0], -1).float()
    n = w2.shape[0]
    codes = w_quantizer.quantize(weight.detach().float()).reshape(n, -1).to(torch.int64)
    zp = _per_channel(w_quantizer.zero_point, n)
    if not torch.equal(zp, zp.round()):
        raise ValueError(f'{w_quantizer.qname}: integer weights need an integral zero point')
    zp = zp.to(torch.int64)
    centred = codes - zp[:, None]
    if int(centred.min()) >= INT8_MIN and int(centred.max()) <= INT8_MAX:
        return centred.to(torch.int8), None, _per_channel(w_quantizer.scale, n)
    if int(codes.min()) < 0 or int(codes.max()) > 255:
        raise ValueError(f'{w_quantizer.qname}: weight codes do not fit 8 bits')
    return (codes - 128).to(torch.int8), (128 - zp).to(torch.int32), _per_channel(w_quantizer.scale, n)


class IntegerLinear(nn.Module):
    """See the module docstring. Build with ``from_quant`` (calibrated) or ``empty`` (loading)."""

    def __init__(self, in_features: int, out_features: int, in_kind: str = 'uniform',
                 in_signed: bool = False, in_bits: int = 8, w_bits: int = 8, out_mode: str = 'float',
                 has_offset: bool = False, out_qmin: int = 0, out_qmax: int = 255, twin_m: int = 0):
        super().__init__()
        if in_kind not in ('uniform', 'twin_gelu'):
            raise ValueError(f'IntegerLinear: in_kind must be uniform or twin_gelu, got {in_kind!r}')
        if out_mode not in OUT_MODES:
            raise ValueError(f'IntegerLinear: out_mode must be one of {OUT_MODES}, got {out_mode!r}')
        self.in_features, self.out_features = in_features, out_features
        self.in_kind, self.in_signed, self.in_bits, self.w_bits = in_kind, in_signed, in_bits, w_bits
        self.out_mode, self.has_offset = out_mode, has_offset
        self.out_qmin, self.out_qmax, self.twin_m = out_qmin, out_qmax, twin_m
        n = out_features
        self.register_buffer('weight_codes', torch.zeros(n, in_features, dtype=torch.int8))
        self.register_buffer('weight_offset', torch.zeros(n if has_offset else 0, dtype=torch.int32))
        self.register_buffer('bias_int', torch.zeros(n, dtype=torch.int32))
        # input grid: Δ_x and z_x (uniform); twin: Δ of the finer region
        self.register_buffer('in_scale', torch.ones((), dtype=torch.float32))
        self.register_buffer('in_zero_point', torch.zeros((), dtype=torch.int32))
        # float mode: Δ_x·Δ_w[c]; dyadic mode: M[c], N, and the output grid (Δ_out, z_out)
        rescaled = out_mode in ('float', 'requant')
        self.register_buffer('acc_scale', torch.ones(n if rescaled else 0, dtype=torch.float32))
        self.register_buffer('bias_float', torch.zeros(n if rescaled else 0, dtype=torch.float32))
        self.register_buffer('multiplier', torch.zeros(n if out_mode == 'dyadic' else 0, dtype=torch.int64))
        self.register_buffer('bias_out', torch.zeros(n if out_mode == 'dyadic' else 0, dtype=torch.int64))
        self.register_buffer('shift', torch.zeros((), dtype=torch.int64))
        self.register_buffer('out_scale', torch.ones((), dtype=torch.float32))
        self.register_buffer('out_zero_point', torch.zeros((), dtype=torch.int64))
        # (Δ, z, q_min, q_max, code dtype) of the next Linear's input grid when GELU and that
        # quantizer run in this layer's epilogue (``fuse_gelu_quantize``): the output is codes
        self.gelu_codes = None
        # (Δ_neg, Δ_pos, h) of the next Linear's twin-uniform input when GELU and its operand
        # split run in this layer's epilogue (``fuse_gelu_twin``): the output is that layer's
        # operand pair (2, ..., out) int8, positive rows first
        self.gelu_twin = None
        self._prepare()

    # --- construction -------------------------------------------------------------------------
    def config(self) -> dict:
        """Constructor arguments (JSON): what the export records to rebuild an empty module."""
        return dict(in_features=self.in_features, out_features=self.out_features,
                    in_kind=self.in_kind, in_signed=self.in_signed, in_bits=self.in_bits,
                    w_bits=self.w_bits, out_mode=self.out_mode, has_offset=self.has_offset,
                    out_qmin=self.out_qmin, out_qmax=self.out_qmax, twin_m=self.twin_m)

    @classmethod
    def from_quant(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], w_quantizer, in_quantizer,
                   out_quantizer=None, requant: str = 'float'):
        """An integer twin of a simulated Linear whose input is quantized by ``in_quantizer``
        (applied by this module) and whose output, when ``out_quantizer`` is a per-tensor uniform
        quantizer, is requantized to its codes: by the float32 rescale and the quantizer's own
        rounding (``requant='float'``, out_mode 'requant') or by a dyadic multiplier
        (``'dyadic'``)."""
        if requant not in ('float', 'dyadic'):
            raise ValueError(f"IntegerLinear: requant must be 'float' or 'dyadic', got {requant!r}")
        from ..quantizers.twin import TwinUniformGeluQuantizer, twin_gelu_steps
        codes, offset, w_scale = weight_codes(w_quantizer, weight)
        n, k = codes.shape
        if isinstance(in_quantizer, TwinUniformGeluQuantizer):
            m = int(in_quantizer.pos_exp)
            d_neg, d_pos = twin_gelu_steps(m, in_quantizer.bits)
            unit = torch.minimum(d_neg, d_pos).reshape(())
            in_kind, signed, z = 'twin_gelu', True, 0
        else:
            if not integer_input_ok(in_quantizer):
                raise ValueError(f'{in_quantizer.qname}: integer input needs a per-tensor uniform quantizer')
            unit = in_quantizer.scale.reshape(()).float()
            z = int(in_quantizer.zero_point.reshape(()))
            in_kind, signed, m = 'uniform', bool(in_quantizer.signed), 0
        codes_out = out_quantizer is not None and integer_input_ok(out_quantizer)
        out_mode = ('float' if not codes_out else 'dyadic' if requant == 'dyadic' else 'requant')
        mod = cls(k, n, in_kind, signed, in_quantizer.bits, w_quantizer.bits, out_mode,
                  offset is not None,
                  out_quantizer.qmin if codes_out else 0,
                  out_quantizer.qmax if codes_out else 255, m)
        acc_scale = (unit.double() * w_scale.double())
        with torch.no_grad():
            mod.weight_codes.copy_(codes)
            if offset is not None:
                mod.weight_offset.copy_(offset)
            mod.in_scale.fill_(float(unit))
            mod.in_zero_point.fill_(z)
            mod.derive_constants()
            if out_mode != 'dyadic':
                mod.acc_scale.copy_(acc_scale.float())
                if bias is not None:
                    mod.bias_float.copy_(bias.detach().float())
                if out_mode == 'requant':
                    mod.out_scale.fill_(float(out_quantizer.scale.reshape(())))
                    mod.out_zero_point.fill_(int(out_quantizer.zero_point.reshape(())))
            else:
                o_scale = out_quantizer.scale.reshape(()).double()
                mult, shift = dyadic(acc_scale / o_scale)
                mod.multiplier.copy_(mult)
                if bias is not None:
                    mod.bias_out.copy_(torch.round(bias.detach().double() / o_scale * 2.0 ** shift)
                                       .to(torch.int64))
                mod.shift.fill_(shift)
                mod.out_scale.fill_(float(out_quantizer.scale.reshape(())))
                mod.out_zero_point.fill_(int(out_quantizer.zero_point.reshape(())))
        mod._prepare()
        return mod

    # buffers computed from the others (``derive_constants``): the export leaves them out
    DERIVED = ('bias_int',)

    @torch.no_grad()
    def derive_constants(self):
        """bias_int = −z_x·Σ_k b[c, k] (− z_x·o[c]·K with a weight offset): the input zero point's
        share of the accumulator, a per-channel int32 constant."""
        z = int(self.in_zero_point)
        b = self.weight_codes.to(torch.int64)
        const = -z * b.sum(dim=1)
        if self.has_offset:
            const = const - z * self.weight_offset.to(torch.int64) * self.in_features
        if int(const.abs().max()) >= 2 ** 31:
            raise ValueError('IntegerLinear: the int32 zero-point term overflows')
        self.bias_int.copy_(const.to(torch.int32))

    def _prepare(self):
        """Hot-path constants derived from the buffers (after construction or loading)."""
        self._b_t = self.weight_codes.t()                       # K×N view of the (N, K) codes
        self._qmin, self._qmax = ((-(2 ** (self.in_bits - 1)), 2 ** (self.in_bits - 1) - 1)
                                  if self.in_signed else (0, 2 ** self.in_bits - 1))
        self._code_dtype = torch.int8 if self.in_signed else torch.uint8
        self._z = int(self.in_zero_point)
        self._scale = float(self.in_scale)
        self._shift = int(self.shift)
        self._zo = int(self.out_zero_point)
        self._round = 1 << (self._shift - 1) if self._shift > 0 else 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._prepare()
        return out

    # --- forward ------------------------------------------------------------------------------
    def input_grid(self):
        """(Δ_x, z_x, q_min, q_max, code dtype) of a uniform input: what ``input_codes`` uses."""
        return self.in_scale, self._z, self._qmin, self._qmax, self._code_dtype

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform: clamp(⌊x/Δ_x⌉ + z_x) as uint8 / int8, the simulated quantizer's codes (an
        integer x is already codes)."""
        if not x.is_floating_point():
            return x.to(self._code_dtype)
        return KERNELS['quantize'](x, *self.input_grid())

    def _twin_operands(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [positive levels; negative levels] (int8), the two halves of a twin-uniform code
        (x: float rows, or the operand pair of a fused previous layer, returned as rows)."""
        from ..quantizers.twin import twin_gelu_steps
        if x.dtype == torch.int8:
            return x.reshape(-1, self.in_features)
        d_neg, d_pos = twin_gelu_steps(self.twin_m, self.in_bits, x.device)
        return twin_operand_rows(x, d_neg, d_pos, 2 ** (self.in_bits - 1))

    def accumulate(self, x2: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """int32 (or int64 for twin inputs) accumulators in units of Δ_x·Δ_w[c], with the bias
        unless ``bias=False``."""
        if self.in_kind == 'twin_gelu':
            a = self._twin_operands(x2)
            acc2 = int_mm(a, self._b_t).to(torch.int64)
            rows = a.shape[0] // 2
            pos, neg = acc2[:rows], acc2[rows:]
            m = self.twin_m        # Δ_pos = 2^m Δ_neg; the unit is the finer step
            acc = (pos << m) + neg if m >= 0 else pos + (neg << -m)
            if self.has_offset:
                lv = a.to(torch.int64)
                sums = (lv[:rows].sum(1) << max(m, 0)) + (lv[rows:].sum(1) << max(-m, 0))
                acc += sums[:, None] * self.weight_offset
            return acc.add_(self.bias_int) if bias else acc
        a = self.input_codes(x2)
        acc = int_mm(a, self._b_t)
        if self.has_offset:
            acc += a.sum(dim=1, dtype=torch.int32)[:, None] * self.weight_offset
        return acc.add_(self.bias_int) if bias else acc

    def requantize(self, acc: torch.Tensor) -> torch.Tensor:
        """Output codes clamp(⌊acc·M·2^−N⌉ + z_out) (int64 multiply, round half up, shift)."""
        q = acc.to(torch.int64).mul_(self.multiplier).add_(self.bias_out).add_(self._round)
        q = q.bitwise_right_shift_(self._shift)
        return q.add_(self.out_zero_point).clamp_(self.out_qmin, self.out_qmax)

    def forward_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Dyadic / requant mode: the next quantizer's codes (int32) instead of their values."""
        shape = x.shape
        if self.out_mode == 'requant':
            x2 = x.reshape(-1, shape[-1])
            q = self._tiles_output(x2, codes=True)
            if q is not None:
                return q.reshape(*shape[:-1], self.out_features)
            acc = self.accumulate(x2, bias=False)
            q = KERNELS['rescale_requantize'](acc, self.bias_int, self.acc_scale, self.bias_float,
                                              self.out_scale, self._zo, self.out_qmin,
                                              self.out_qmax, True, in_place=True)
            return q.reshape(*shape[:-1], self.out_features)
        acc = self.accumulate(x.reshape(-1, shape[-1]))
        return self.requantize(acc).to(torch.int32).reshape(*shape[:-1], self.out_features)

    def _twin_float_compiled(self, x2: torch.Tensor, pairs: bool = False):
        """Twin-uniform input, float output, compiled kernels: the two row blocks' int32 products
        joined and rescaled in one pass (the values of ``accumulate`` + rescale), a block of rows
        at a time so the operands and products stay small (``pairs``: x2 is already the operand
        rows, one GEMM); None where that does not apply."""
        ops = _native_ops(x2, torch.int8 if pairs else torch.float32)
        if ops is None or self.in_kind != 'twin_gelu' or self.out_mode != 'float' \
                or self.has_offset:
            return None
        def rescale(a2, out):
            tiles = tile_product(a2, self._b_t)
            if tiles is None:
                ops.twin_rescale(int_mm(a2, self._b_t), self.twin_m, self.bias_int,
                                 self.acc_scale, self.bias_float, out)
            else:
                tiles[0].tiles_twin_rescale(a2, tiles[1], self.out_features, self.twin_m,
                                            self.bias_int, self.acc_scale, self.bias_float, out)

        if pairs:
            y = torch.empty((x2.shape[0] // 2, self.out_features), dtype=torch.float32)
            rescale(x2, y)
            return y
        y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        for i in range(0, x2.shape[0], TWIN_ROWS):
            rescale(self._twin_operands(x2[i:i + TWIN_ROWS]), y[i:i + TWIN_ROWS])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float input (quantized here), integer input = codes of the input quantizer, or, for a
        twin-uniform input, the operand pair (2, ..., in) int8 of a ``fuse_gelu_twin`` layer."""
        if x.dtype == torch.int8 and self.in_kind == 'twin_gelu':
            if x.shape[0] != 2 or x.shape[-1] != self.in_features:
                raise ValueError(f'IntegerLinear: twin operand pair (2, ..., {self.in_features}) '
                                 f'expected, got {tuple(x.shape)}')
            shape = x.shape[1:]
            x2 = x.reshape(-1, self.in_features)
            y = self._twin_float_compiled(x2, pairs=True)
            if y is None:
                y = self._float_output(self.accumulate(x2, bias=False))
            return y.reshape(*shape[:-1], self.out_features)
        shape = x.shape
        y = self._tiles_output(x.reshape(-1, shape[-1]))
        if y is not None:
            if self.gelu_twin is not None:
                return y.reshape(2, *shape[:-1], self.out_features)
            return y.reshape(*shape[:-1], self.out_features)
        if not x.is_floating_point() and self.in_kind == 'uniform':
            a = self.input_codes(x.reshape(-1, shape[-1]))
            acc = int_mm(a, self._b_t)
            if self.has_offset:
                acc += a.sum(dim=1, dtype=torch.int32)[:, None] * self.weight_offset
        else:
            x2 = x.reshape(-1, shape[-1])
            y = self._twin_float_compiled(x2)
            if y is not None:
                return y.reshape(*shape[:-1], self.out_features)
            acc = self.accumulate(x2, bias=False)
        y = self._float_output(acc)
        if self.gelu_twin is not None:
            return y.reshape(2, *shape[:-1], self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def tile_operands(self, x2: torch.Tensor):
        """(ops, a, packed) where this layer's product of the rows x2 (float values or input
        codes) runs on AMX tiles inside a ``tiles_*`` epilogue: uniform inputs without a weight
        offset, the compiled kernels on with AMX; else None."""
        if self.in_kind != 'uniform' or self.has_offset or x2.device.type != 'cpu' \
                or kernels.amx_ops() is None:
            return None
        a = self.input_codes(x2)
        tiles = tile_product(a, self._b_t)
        return None if tiles is None else (tiles[0], a, tiles[1])

    def _tiles_output(self, x2: torch.Tensor, codes: bool = False):
        """``_float_output`` (``codes``: the requant codes of ``forward_codes``) with the int32
        product computed block by block inside the epilogue op on AMX tiles (``tile_operands``);
        None where that route does not apply (dyadic outputs, offsets, no AMX)."""
        if self.out_mode == 'dyadic' or (codes and self.out_mode != 'requant') \
                or KERNELS['rescale'] is not _rescale_native:
            return None
        route = self.tile_operands(x2)
        if route is None:
            return None
        ops, a, packed = route
        n, params = self.out_features, (self.bias_int, self.acc_scale, self.bias_float)
        if self.out_mode == 'requant':
            return ops.tiles_rescale(a, packed, n, *params, 2 if codes else 1,
                                     float(self.out_scale), self._zo, self.out_qmin,
                                     self.out_qmax)
        if self.gelu_codes is not None:
            return ops.tiles_rescale_gelu_quantize(a, packed, n, *params, *self.gelu_codes)
        if self.gelu_twin is not None:
            return ops.tiles_rescale_gelu_twin(a, packed, n, *params, *self.gelu_twin)
        return ops.tiles_rescale(a, packed, n, *params, 0, 1.0, 0, 0, 0)

    def _float_output(self, acc: torch.Tensor) -> torch.Tensor:
        """The output of the int32 accumulator (no bias added yet) by ``out_mode``."""
        if self.out_mode == 'requant':
            y = KERNELS['rescale_requantize'](acc, self.bias_int, self.acc_scale, self.bias_float,
                                              self.out_scale, self._zo, self.out_qmin,
                                              self.out_qmax, False, in_place=True)
        elif self.out_mode == 'dyadic':
            y = KERNELS['requantize'](acc, self.bias_int, self.multiplier, self.bias_out, self._round, self._shift,
                                      self.out_zero_point, self.out_qmin, self.out_qmax, self.out_scale)
        elif self.gelu_codes is not None:
            y = self._rescale_gelu_codes(acc)
        elif self.gelu_twin is not None:
            y = self._rescale_gelu_twin(acc)
        else:
            y = KERNELS['rescale'](acc, self.bias_int, self.acc_scale, self.bias_float,
                                   in_place=True)
        return y

    def fuse_gelu_quantize(self, next_linear: 'IntegerLinear') -> None:
        """Float-output layer followed by GELU and ``next_linear`` (uniform input): return the
        codes next_linear's quantizer gives rational_gelu(y) instead of y (one pass over the
        accumulator instead of rescale, GELU and quantization passes; the same codes)."""
        if self.out_mode != 'float' or next_linear.in_kind != 'uniform':
            raise ValueError('fuse_gelu_quantize: a float-output layer and a uniform-input one')
        self.gelu_codes = (float(next_linear.in_scale), next_linear._z, next_linear._qmin,
                           next_linear._qmax, next_linear._code_dtype)

    def fuse_gelu_twin(self, next_linear: 'IntegerLinear') -> None:
        """Float-output layer followed by GELU and ``next_linear`` (PTQ4ViT's twin-uniform
        post-GELU input): return next_linear's operand pair of rational_gelu(y) instead of y (one
        pass instead of rescale, GELU and the operand split; the same operands)."""
        from ..quantizers.twin import twin_gelu_steps
        if self.out_mode != 'float' or next_linear.in_kind != 'twin_gelu':
            raise ValueError('fuse_gelu_twin: a float-output layer and a twin-uniform-input one')
        d_neg, d_pos = twin_gelu_steps(next_linear.twin_m, next_linear.in_bits, 'cpu')
        self.gelu_twin = (float(d_neg), float(d_pos), 2 ** (next_linear.in_bits - 1))

    def _rescale_gelu_twin(self, acc: torch.Tensor) -> torch.Tensor:
        from ..nn.exact import rational_gelu
        d_neg, d_pos, h = self.gelu_twin
        ops = _native_ops(acc, torch.int32)
        if ops is not None and acc.dim() == 2:
            return ops.rescale_gelu_twin(acc.contiguous(), self.bias_int, self.acc_scale,
                                         self.bias_float, d_neg, d_pos, h)
        y = rational_gelu(_rescale(acc, self.bias_int, self.acc_scale, self.bias_float))
        return twin_operand_rows(y, torch.tensor(d_neg), torch.tensor(d_pos), h)

    def _rescale_gelu_codes(self, acc: torch.Tensor) -> torch.Tensor:
        from ..nn.exact import rational_gelu
        s, z, qmin, qmax, dtype = self.gelu_codes
        ops = _native_ops(acc, torch.int32)
        if ops is not None and acc.dim() == 2:
            return ops.rescale_gelu_quantize(acc.contiguous(), self.bias_int, self.acc_scale,
                                             self.bias_float, s, z, qmin, qmax, dtype)
        y = _rescale(acc, self.bias_int, self.acc_scale, self.bias_float)
        return _quantize_input(rational_gelu(y), s, z, qmin, qmax, dtype)

    def extra_repr(self):
        return (f'{self.in_features}→{self.out_features}, in={self.in_kind}'
                f'{"/s" if self.in_signed else "/u"}{self.in_bits}, w{self.w_bits}, out={self.out_mode}'
                + (', +GELU→next codes' if self.gelu_codes is not None else '')
                + (', +GELU→next twin operands' if self.gelu_twin is not None else ''))


def integer_input_ok(q) -> bool:
    """A per-tensor uniform quantizer with an integral zero point (codes fit 8 bits)."""
    from ..quantizers.uniform import UniformQuantizer
    return (type(q) is UniformQuantizer and q.scale.numel() == 1 and q.zero_point.numel() == 1
            and q.bits <= 8 and float(q.zero_point) == round(float(q.zero_point)))


class IntegerPatchEmbed(nn.Module):
    """A non-overlapping patch convolution (kernel = stride, no padding) as ``IntegerLinear`` over
    the flattened patches (channel-major, the order of the conv weight)."""

    def __init__(self, linear: IntegerLinear, patch_size, out_channels: int):
        super().__init__()
        self.linear = linear
        self.patch_size = tuple(patch_size)
        self.out_channels = out_channels

    supports = staticmethod(is_patch_conv)

    def forward(self, x):
        patches, (gh, gw) = patch_rows(x, self.patch_size)
        y = self.linear(patches)                                     # (B, L, out)
        return y.transpose(1, 2).reshape(-1, self.out_channels, gh, gw)


def patch_rows(x: torch.Tensor, patch_size):
    """(B, L, C·ph·pw) rows of the non-overlapping patches of x (B, C, H, W), channel-major as a
    conv weight is laid out, and the patch grid (gh, gw); a ragged border is dropped, as the
    stride-ph convolution drops it."""
    _, C, H, W = x.shape
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    x = x[:, :, :gh * ph, :gw * pw].reshape(-1, C, gh, ph, gw, pw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, gh * gw, C * ph * pw), (gh, gw)
