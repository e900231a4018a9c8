"""Residual-stream kernels on codes: FQ-ViT integer LayerNorm on PTF codes and the integer
residual add.

``int_layernorm_codes(codes, in_quantizer, weight, bias, out_quantizer)`` — PTF (or per-tensor
unsigned uniform) input codes → ``ln_output`` codes, bit-exact with the simulation
(``QuantLayerNorm`` integer mode = ``int_layernorm_fake_quant``):

* integer: the shifted codes x_c = (q − z)·2^α_c (a left shift: every channel in units of Δ_1),
  S1 = Σ x_c, S2 = Σ x_c², D = C·S2 − S1² (exact integers), the output
  y = ⌊(M_c·x_c + B_c) / 2^N_c⌉ + z_out, clamped (integer multiply-add and rounding shift);
* per token, the dyadic parameters M_c (8-bit), N_c, B_c are derived from the exact integers
  S1, D and the float γ, β, Δ_1, Δ_out as in FQ-ViT's official code (σ = Δ_1/C·sqrt(D + eps·C²/Δ_1²)
  in float64, γ and β stay float: FQ-ViT issue #42). An integer square root would change σ and
  with it M, i.e. the codes, so it is not used: the parameters are the simulation's to the bit.
  The integer parts run in float64 carrying exact integers (< 2^52, checked per chunk; a chunk
  that could leave that range runs the int64 reference) — ``quantizers.ptf.int_layernorm``.

``int_residual_add(a_codes, a_quantizer, b_codes, b_quantizer, out_quantizer)`` — the residual
sum x + f(x) of two quantized operands (FQ-ViT: PTF residual codes + the uniform
``attn_output`` / ``mlp_output`` codes) requantized to the ``residual`` quantizer's codes:
y = clamp(⌊(a − z_a)·m_a,c + (b − z_b)·m_b,c⌉ + z_out, 0, q_max) with per-channel multipliers
m = Δ_in,c/Δ_out,c as dyadic numbers sharing one N per channel (``requantize``). Bound: exact
but for the dyadic rounding, ≤ 1 code from the exactly rounded sum; the float32 simulation
rounds its products and sum, so it agrees with the exact result except within float32 rounding
of a tie: ≤ 1 code (asserted in the tests).
"""
import math
from typing import Tuple

import torch
from torch import nn

from ..nn.modules import QuantLayerNorm
from ..quantizers.ptf import PTFQuantizer, int_layernorm
from ..quantizers.uniform import UniformQuantizer
from ..quantizers.base import chunk_step, scratch
from .attention import dyadic_values, requantize
from .kernels import args_key


def _int_zero(z: torch.Tensor, who: str) -> int:
    z = z.reshape(-1)
    if z.numel() != 1 or float(z) != round(float(z)):
        raise ValueError(f'{who}: an integer-valued per-tensor zero point is required, got {z}')
    return int(round(float(z)))


def ptf_shifted_codes(codes: torch.Tensor, zero_point, alpha: torch.Tensor) -> torch.Tensor:
    """x_c = (q − z) << α_c (int32): PTF codes in units of Δ_1 (channels on the last dim)."""
    z = _int_zero(torch.as_tensor(zero_point), 'ptf_shifted_codes')
    alpha = torch.as_tensor(alpha, device=codes.device).to(torch.int32).reshape(-1)
    x = codes.to(torch.int32) - z
    return torch.bitwise_left_shift(x, alpha) if bool((alpha != 0).any()) else x


def _expand(t: torch.Tensor, expand: int, mode: str) -> torch.Tensor:
    if expand == 1 or t.numel() == 1:
        return t
    t = t.reshape(-1)
    return t.repeat(expand) if mode == 'repeat' else t.repeat_interleave(expand)


def layernorm_input_params(q, expand: int = 1, expand_mode: str = 'repeat'):
    """(base scale Δ_1, zero point, α) of a LayerNorm input quantizer: a ``PTFQuantizer`` or a
    per-tensor unsigned ``UniformQuantizer`` (α = 0), as ``nn.modules.IntegerInput`` reads them."""
    if isinstance(q, PTFQuantizer):
        return q.base_scale.reshape(()), q.zero_point.reshape(()), _expand(q.alpha, expand,
                                                                          expand_mode)
    if type(q) is UniformQuantizer and q.ch_axis is None and not q.signed and q.scale.numel() == 1:
        return q.scale.reshape(()), q.zero_point.reshape(()), torch.zeros(
            (), dtype=torch.long, device=q.scale.device)
    raise TypeError(f'integer LayerNorm input: PTFQuantizer or per-tensor unsigned '
                    f'UniformQuantizer expected, got {type(q).__name__}')


def int_layernorm_codes(codes: torch.Tensor, in_quantizer, weight, bias, out_quantizer,
                        eps: float = 1e-5, dyadic_bits: int = 8, fold_mean: bool = True,
                        expand: int = 1, expand_mode: str = 'repeat') -> torch.Tensor:
    """FQ-ViT integer LayerNorm over the last dim: input codes of ``in_quantizer`` (PTF or
    per-tensor unsigned uniform) → int32 codes of ``out_quantizer`` (per-tensor unsigned
    uniform). Bit-exact with ``QuantLayerNorm``'s integer mode. ``expand`` / ``expand_mode``:
    Swin patch merging (see ``nn.modules.IntegerInput``)."""
    base, zp, alpha = layernorm_input_params(in_quantizer, expand, expand_mode)
    oq = out_quantizer
    if not (type(oq) is UniformQuantizer and oq.ch_axis is None and not oq.signed
            and oq.scale.numel() == 1):
        raise TypeError('integer LayerNorm output: per-tensor unsigned UniformQuantizer expected, '
                        f'got {oq!r}')
    x = ptf_shifted_codes(codes, zp, alpha)
    return int_layernorm(x, base, weight, bias, oq.scale.reshape(()), oq.zero_point.reshape(()),
                         out_bits=oq.bits, eps=eps, dyadic_bits=dyadic_bits, fold_mean=fold_mean)


def residual_params(q) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """(scale, zero point, q_min, q_max) of a residual-stream operand's quantizer, the scale per
    channel of the last dim or scalar: PTF (Δ_1·2^α_c) or uniform (per tensor / ch_axis = −1)."""
    if isinstance(q, PTFQuantizer):
        if q.ch_axis not in (-1,):
            raise ValueError(f'{q.qname}: PTF channels must be the last dim (ch_axis=-1)')
        return q.channel_scale.reshape(-1), q.zero_point.reshape(()), q.qmin, q.qmax
    if isinstance(q, UniformQuantizer):
        if q.scale.numel() != 1 and q.ch_axis not in (-1,):
            raise ValueError(f'{q.qname}: per-channel residual operands must be channel-last')
        s = q.scale.reshape(()) if q.scale.numel() == 1 else q.scale.reshape(-1)
        z = q.zero_point.reshape(()) if q.zero_point.numel() == 1 else q.zero_point.reshape(-1)
        return s, z, q.qmin, q.qmax
    raise TypeError(f'residual add: PTFQuantizer or UniformQuantizer expected, got '
                    f'{type(q).__name__}')


def int_residual_add(a_codes: torch.Tensor, a_quantizer, b_codes: torch.Tensor, b_quantizer,
                     out_quantizer, method: str = 'dyadic') -> torch.Tensor:
    """Codes of ``out_quantizer`` for â + b̂ (channels on the last dim), from the integer codes
    of both operands; int32. See the module docstring for the bound.

    ``method='dyadic'``: y = clamp(⌊a·M_a,c·2^−N_c + b·M_b,c·2^−N_c + K_c⌉ + z_out) with
    K_c = −(z_a·M_a,c + z_b·M_b,c)·2^−N_c: every term an integer times 2^−N_c below 2^52, so the
    float64 evaluation is the exact integer one (``requantize``'s multipliers), computed in
    cache-sized chunks of tokens."""
    sa, za, a_lo, a_hi = residual_params(a_quantizer)
    sb, zb, b_lo, b_hi = residual_params(b_quantizer)
    so, zo, qmin, qmax = residual_params(out_quantizer)
    if zo.numel() != 1:
        raise ValueError('int_residual_add: the output zero point must be per tensor')
    if a_codes.shape != b_codes.shape:
        raise ValueError(f'int_residual_add: operand shapes differ: {tuple(a_codes.shape)} vs '
                         f'{tuple(b_codes.shape)}')
    dev = a_codes.device
    f64 = dict(dtype=torch.float64, device=dev)
    for z in (za, zb, zo):
        if not bool((z == torch.round(z)).all()):
            raise ValueError(f'int_residual_add: integer-valued zero points required, got {z}')
    ma = sa.to(**f64) / so.to(**f64)
    mb = sb.to(**f64) / so.to(**f64)
    # |a − z_a| + |b − z_b| from the code ranges (no pass over the data)
    bound = sum(max(abs(hi_ - float(z.min())), abs(float(z.max()) - lo_))
                for z, lo_, hi_ in ((za, a_lo, a_hi), (zb, b_lo, b_hi)))
    bound = int(math.ceil(bound))
    if method != 'dyadic':
        a = a_codes.to(torch.int32) - za.to(dev).round().to(torch.int32)
        b = b_codes.to(torch.int32) - zb.to(dev).round().to(torch.int32)
        return requantize([a, b], [ma, mb], zo.to(dev), qmin, qmax, method=method, bound=bound)
    (ma, mb), _, exact = dyadic_values([ma, mb], bound)
    if not exact:
        raise OverflowError('int_residual_add: operand codes too wide for the dyadic path')
    ma, mb = ma.to(dev), mb.to(dev)
    k = -(za.to(**f64) * ma + zb.to(**f64) * mb)          # exact: z·M·2^−N
    z_out = float(zo)
    C = a_codes.shape[-1] if a_codes.dim() else 1
    a2, b2 = a_codes.reshape(-1, C), b_codes.reshape(-1, C)
    out = torch.empty(a2.shape, dtype=torch.int32, device=dev)
    step = chunk_step(C, device=dev)
    for i in range(0, a2.shape[0], step):
        t = scratch('res_t', a2[i:i + step].shape, torch.float64, dev)
        torch.mul(a2[i:i + step], ma, out=t)
        t.addcmul_(b2[i:i + step].to(torch.float64), mb).add_(k)
        out[i:i + step] = t.round_().add_(z_out).clamp_(qmin, qmax)
    return out.reshape(a_codes.shape)


class CompiledIntLayerNorm(QuantLayerNorm):
    """A ``QuantLayerNorm`` in FQ-ViT integer mode whose integer LayerNorm runs as one compiled
    loop per row (``kernels.py``'s ``int_layernorm``: the exact-float64 route of
    ``int_layernorm_fake_quant`` with its bounds checked per row; rows where a bound fails go
    through the reference). Same values, bit for bit; otherwise ``QuantLayerNorm``. The kernel's
    arguments are prepared once and kept while the tensors they come from are unchanged (same
    objects, same in-place version counters)."""

    def _kernel_args(self, pair, x):
        from ..quantizers.ptf import layernorm_fake_quant_setup
        iq, oq = pair
        q = iq.quantizer
        tensors = [self.weight, self.bias, q.zero_point, oq.scale, oq.zero_point,
                   getattr(q, 'base_scale', None), getattr(q, 'alpha', None),
                   getattr(q, 'scale', None)]
        key = (x.shape[-1], str(x.device), id(q), id(oq), q.bits, oq.bits) + args_key(*tensors)
        cache = getattr(self, '_args_cache', None)
        if cache is not None and cache[0] == key:
            return cache[1]
        st = layernorm_fake_quant_setup(x, iq, self.weight, self.bias, oq)
        args = None
        if st is not None:
            C, p = st['C'], st['params']
            f64 = dict(dtype=torch.float64)
            sign = p['sign'] if p['sign'] is not None else torch.empty(0, **f64)
            args = (st['s_in'].float().reshape(-1).expand(C).contiguous(),
                    st['factor'].to(**f64).expand(C).contiguous(), st['lo_in'], st['hi_in'],
                    p['gamma'].contiguous(), p['gamma_abs'].contiguous(), p['beta'].contiguous(),
                    p['beta_out'].contiguous(), sign.contiguous(), float(p['delta1']),
                    float(p['delta_out']), float(self.eps), 8, True, st['lo_out'], st['hi_out'],
                    st['s_out'])
        self._args_cache = (key, args)
        return args

    def _compiled(self, x):
        """(ops, the integer pair, the kernel's arguments), or None where the kernel does not
        apply."""
        from . import kernels
        pair = self._integer_pair()
        ops = kernels.native() if pair is not None and x.device.type == 'cpu' \
            and x.dtype == torch.float32 and x.dim() >= 1 and x.numel() > 0 else None
        args = self._kernel_args(pair, x) if ops is not None else None
        return None if args is None else (ops, pair, args)

    def _reference_rows(self, x2, bad_rows, pair):
        from ..quantizers.ptf import int_layernorm_fake_quant
        return int_layernorm_fake_quant(x2[bad_rows], pair[0], self.weight, self.bias, pair[1],
                                        eps=self.eps)

    def forward(self, x):
        route = self._compiled(x)
        if route is None:
            return super().forward(x)
        ops, pair, args = route
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out, ok, nbad = ops.int_layernorm(x2, *args)
        if nbad:
            bad = (~ok).nonzero().reshape(-1)
            out[bad] = self._reference_rows(x2, bad, pair)
        return out.reshape(x.shape)

    def forward_codes(self, x, grid):
        """The codes clamp(⌊y/Δ⌉ + z, q_min, q_max) (``grid`` = (Δ, z, q_min, q_max, dtype), a
        uniform quantizer's) of this norm's output values y, which are never stored as floats
        where the compiled kernel runs: the input codes of the Linear it feeds."""
        from .linear import KERNELS
        scale, z, qmin, qmax, dtype = grid
        route = self._compiled(x)
        if route is None:
            return KERNELS['quantize'](self(x), scale, z, qmin, qmax, dtype)
        ops, pair, args = route
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        codes, ok, nbad = ops.int_layernorm_codes(x2, *args, float(scale), z, qmin, qmax, dtype)
        if nbad:
            bad = (~ok).nonzero().reshape(-1)
            codes[bad] = KERNELS['quantize'](self._reference_rows(x2, bad, pair), scale, z, qmin,
                                             qmax, dtype)
        return codes.reshape(x.shape)


def retype_modules(model: nn.Module, old: type, new: type, where=None) -> int:
    """Give every module of exactly class ``old`` (and ``where(module)``, if given) the class
    ``new``, a subclass with the same state; returns how many."""
    n = 0
    for mod in model.modules():
        if type(mod) is old and (where is None or where(mod)):
            mod.__class__ = new
            n += 1
    return n


def compile_integer_layernorms(model: nn.Module) -> int:
    """Turn every ``QuantLayerNorm`` that runs FQ-ViT's integer LayerNorm into a
    ``CompiledIntLayerNorm`` (same module state)."""
    return retype_modules(model, QuantLayerNorm, CompiledIntLayerNorm,
                          lambda m: m._integer_pair() is not None)


class CompiledPTFQuantizer(PTFQuantizer):
    """A ``PTFQuantizer`` whose fake quantization (channels on the last dim, integral zero point,
    no autograd) runs as one compiled loop (``kernels.py``'s ``fake_quant``: the same operations
    as ``fake_quant_chunked``, bit for bit); otherwise ``PTFQuantizer``."""

    def _kernel_args(self):
        key = args_key(self.base_scale, self.alpha, self.zero_point)
        cache = getattr(self, '_args_cache', None)
        if cache is not None and cache[0] == key:
            return cache[1]
        from ..quantizers.base import is_integral
        args = None
        z = self.zero_point
        s = self.channel_scale
        if (z.numel() == 1 and is_integral(z) and s.dtype == torch.float32
                and bool((s > 0).all())):
            zf = float(z)
            args = (s.reshape(-1).contiguous(), self.qmin - zf, self.qmax - zf)
        self._args_cache = (key, args)
        return args

    def _compiled(self, x):
        """(ops, the kernel's arguments) where the compiled loop applies to x, else None."""
        from ..quantizers.base import needs_autograd
        from . import kernels
        ops = kernels.native() if (x.device.type == 'cpu' and x.dtype == torch.float32
                                   and x.dim() >= 1 and x.numel() > 0
                                   and self.ch_axis % x.dim() == x.dim() - 1
                                   and not needs_autograd(x, self.base_scale)) else None
        args = self._kernel_args() if ops is not None else None
        return None if args is None or args[0].numel() != x.shape[-1] else (ops, args)

    def fake_quant(self, x):
        route = self._compiled(x)
        if route is None:
            return super().fake_quant(x)
        ops, args = route
        return ops.fake_quant(x.reshape(-1, x.shape[-1]).contiguous(), *args).reshape(x.shape)

    def add_fake_quant(self, a, b):
        """``self(a + b)`` in one pass where the compiled loop applies (the quantized residual
        sum: the same float32 sum, then the same fake quantization)."""
        route = self._compiled(a) if self.mode == 'quant' and a.shape == b.shape \
            and b.dtype == a.dtype and b.device == a.device else None
        if route is None:
            return self(a + b)
        ops, args = route
        C = a.shape[-1]
        return ops.add_fake_quant(a.reshape(-1, C).contiguous(), b.reshape(-1, C).contiguous(),
                                  *args).reshape(a.shape)


def compile_ptf_quantizers(model: nn.Module) -> int:
    """Turn every ``PTFQuantizer`` into a ``CompiledPTFQuantizer`` (same state)."""
    return retype_modules(model, PTFQuantizer, CompiledPTFQuantizer)
