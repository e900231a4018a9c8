"""Integer-exact simulation: quantized GEMMs computed on their codes, as the integer model does.

The default simulation multiplies dequantized values in float32: every product and partial sum is
rounded, in an order that depends on the GEMM kernel (and so on the batch size). Where a result
lies within that rounding of a quantization tie, the next quantizer's code flips; at 4 bits such
flips compound over the blocks, and two float32 evaluations of the same model differ by up to a
point of top-1 on 1,300 images.

``set_exact_arithmetic(model)`` switches a calibrated model to the arithmetic of
``fqvit_det.integer``: every Linear / convolution whose input and weight are on uniform grids
(per-tensor input with an integral zero point, or PTQ4ViT's twin-uniform post-GELU input; uniform
weight) computes

    acc = Σ_k (q_x − z_x)_k (q_w − z_w)_k        exactly (float64 GEMM on the codes)
    y   = float32(acc) · float32(Δ_x·Δ_w[c]) + bias

and attention computes QKᵀ on the q / k codes the same way (logits = float32(acc·Δ_q·Δ_k·scale),
the product formed in float64) and P·V as float64(P̂) @ float64(v codes) · Δ_v, rounded once to
float32. These are the formulas the integer kernels evaluate (``IntegerLinear`` with
``requant='float'``, ``IntegerAttention`` with ``method='simulation'``), so the integer model
reproduces this simulation up to float64 rounding in P·V for irrational probability levels
(log√2, AdaLog), rather than up to float32 GEMM rounding.

A Linear or patch convolution (kernel = stride) whose weight is quantized but whose input the
method keeps float (PTQ4ViT's patch embedding reads the image itself) has no codes to multiply; by
default it computes as in the float32 simulation. ``float_input_gemm='float64'`` (the ONNX exact
export's choice) makes it y = float32(Σ_k x_k·ŵ_k in float64) + bias instead: every product of two
float32 values is exact in float64 and the sum's rounding is ~2^-40 of the float32 step, so the
float32 result no longer depends on the GEMM kernel's summation order (torch's float32
convolution and onnxruntime's disagree in the last bit on most images, and those bits reach the
next quantizer). It is not the default because it costs PTQ4ViT's integer DeiT-Tiny ~20 % at
batch 32. Everything else (LayerNorm, softmax, GELU, residual adds, the quantizers themselves) is
unchanged.

GELU is the one float function whose value differs between backends by more than rounding:
torch's float32 kernel evaluates erf by its own approximation (errors up to ~1e-6), onnxruntime by
another, and a difference that lands on a rounding tie of the next quantizer moves a whole step.
The exact arithmetic therefore evaluates GELU as ``rational_gelu``: erf by Abramowitz & Stegun
7.1.28 (|erf error| ≤ 3·10⁻⁷; evaluated in float32 the GELU is within 1e-6·|x|, torch's own
float32 GELU within ~1.2e-6), written with float32 +, −, ×, ÷ only, so every IEEE backend
(torch eager, the compiled integer kernels, onnxruntime) gets the same bits.

The switch changes arithmetic, not parameters: calibration and the quant state are the same
either way. Off by default (the published tables use the float32 simulation).
"""
import contextlib
from typing import Optional

import torch
from torch import nn

from ..quantizers.uniform import UniformQuantizer


# Abramowitz & Stegun 7.1.28: erf(z) ≈ 1 − (1 + a1·z + … + a6·z⁶)^−16 for z ≥ 0, |error| ≤ 3e-7
ERF_COEFFS = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)
SQRT1_2 = 0.7071067811865476


def rational_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x/2·(1 + erf(x/√2)) with erf by A&S 7.1.28, in float32 +, −, ×, ÷ in a fixed
    order (Horner from a6, four squarings for the 16th power, one division): for x ≥ 0,
    x/2·(2 − P^−16); for x < 0, x/2·P^−16 (no cancellation). Every IEEE float32 backend gets
    the same bits; the compiled integer kernel (``rational_gelu_``) evaluates the same sequence."""
    z = torch.abs(x) * SQRT1_2
    p = z * ERF_COEFFS[5] + ERF_COEFFS[4]
    for a in (ERF_COEFFS[3], ERF_COEFFS[2], ERF_COEFFS[1], ERF_COEFFS[0], 1.0):
        p = p * z + a
    for _ in range(4):
        p = p * p
    r = torch.ones((), dtype=p.dtype, device=p.device) / p
    return (x * 0.5) * torch.where(x >= 0, 2.0 - r, r)


class RationalGELU(nn.Module):
    """``nn.GELU`` (approximate='none') as ``rational_gelu``: installed by
    ``set_exact_arithmetic`` and in the integer model."""

    def forward(self, x):
        return rational_gelu(x)


def use_rational_gelu(model: nn.Module, enabled: bool = True) -> int:
    """Swap every ``nn.GELU`` (approximate='none') child of ``model`` for ``RationalGELU`` (or
    back); returns how many were swapped."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if enabled and type(child) is nn.GELU and child.approximate == 'none':
                swaps.append((parent, name, RationalGELU()))
            elif not enabled and type(child) is RationalGELU:
                swaps.append((parent, name, nn.GELU()))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)


def exact_unit(q) -> Optional[torch.Tensor]:
    """The step Δ (float32, 0-dim) in which a quantizer's outputs are exact integers (its values
    are (q − z)·Δ), or None when the quantizer's values are not on one uniform grid."""
    from ..quantizers.twin import TwinUniformGeluQuantizer, twin_gelu_steps
    if q is None or getattr(q, 'mode', None) != 'quant':
        return None
    if isinstance(q, TwinUniformGeluQuantizer):
        d_neg, d_pos = twin_gelu_steps(q.pos_exp, q.bits)
        return torch.minimum(d_neg, d_pos).reshape(())
    if (type(q) is UniformQuantizer and q.scale.numel() == 1 and q.zero_point.numel() == 1
            and q.bits <= 8 and float(q.zero_point) == round(float(q.zero_point))):
        return q.scale.detach().reshape(()).float()
    return None


def exact_weight_ok(wq) -> bool:
    """A uniform weight quantizer (per tensor or per output channel) with integral zero points."""
    return (wq is not None and getattr(wq, 'mode', None) == 'quant' and type(wq) is UniformQuantizer
            and (wq.ch_axis is None or wq.ch_axis == 0)
            and bool(torch.equal(wq.zero_point, wq.zero_point.round())))


def exact_grid(q) -> Optional[torch.Tensor]:
    """Per-tensor or per-head (ch_axis 1 of (B, H, N, d)) uniform q / k / v grid: its step Δ, or None."""
    if q is None or getattr(q, 'mode', None) != 'quant' or type(q) is not UniformQuantizer:
        return None
    if not bool(torch.equal(q.zero_point, q.zero_point.round())):
        return None
    if q.scale.numel() == 1:
        return q.scale.detach().reshape(()).float()
    if q.ch_axis is not None and q.ch_axis % 4 == 1:
        return q.scale.detach().reshape(1, -1, 1, 1).float()
    return None


FLOAT_INPUT_GEMMS = ('float32', 'float64')


def set_exact_arithmetic(model: nn.Module, enabled: bool = True,
                         float_input_gemm: str = 'float32') -> int:
    """Switch the quantized GEMMs of a calibrated ``model`` to integer-exact arithmetic and its
    GELUs to ``rational_gelu`` (module docstring), or back (``enabled=False``). Returns how many
    layers and attentions compute exactly (float-input GEMMs in float64 included).
    ``float_input_gemm``: 'float32' (default) or 'float64' for quantized layers on float inputs.
    Call it after calibration: which layers qualify is decided now; their grids are read at each
    forward (a layer whose quantizers leave 'quant' mode computes as usual)."""
    from ..walk import feeding_norms
    from .modules import AttentionQuantizers, QuantConv2d, QuantLinear, QuantLayerNorm
    if float_input_gemm not in FLOAT_INPUT_GEMMS:
        raise ValueError(f'set_exact_arithmetic: float_input_gemm must be one of '
                         f'{FLOAT_INPUT_GEMMS}, got {float_input_gemm!r}')
    feeds = feeding_norms(model)
    use_rational_gelu(model, enabled)
    count = 0
    for path, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            mod._exact, mod._float64_gemm = None, False
            if not enabled:
                continue
            if float_input_gemm == 'float64' and float_input_layer(mod, path in feeds):
                mod._float64_gemm = True
                count += 1
                continue
            in_q = mod.in_quantizer
            if in_q is None and path in feeds:
                norm = model.get_submodule(feeds[path])
                if isinstance(norm, QuantLayerNorm):
                    in_q = norm.out_quantizer if norm.out_quantizer is not None else norm.output_target
            if (exact_unit(in_q) is None or not exact_weight_ok(mod.w_quantizer)
                    or mod.input_channel_scale() is not None
                    or getattr(mod, 'bias_correction', None) is not None
                    or getattr(mod, 'groups', 1) != 1):
                continue
            mod._exact = (in_q,)
            mod._exact_cache = None
            count += 1
        elif isinstance(mod, AttentionQuantizers):
            mod._exact = (None,) if enabled else None
            count += enabled
    if enabled:   # FQ-ViT: q, k, v arrive quantized by the qkv Linear's output quantizer
        for mod in model.modules():
            aq, qkv = getattr(mod, 'aq', None), getattr(mod, 'qkv', None)
            if isinstance(aq, AttentionQuantizers) and isinstance(qkv, QuantLinear):
                aq._exact = (qkv.out_quantizer if exact_grid(qkv.out_quantizer) is not None else None,)
    return count


def float_input_layer(mod, fed_by_norm: bool) -> bool:
    """A quantized Linear / patch convolution whose input stays float (no input quantizer, not
    fed by a LayerNorm) and whose uniform weight has no input-channel scale or bias correction:
    ``set_exact_arithmetic(..., float_input_gemm='float64')`` runs its GEMM in float64."""
    from .modules import QuantConv2d, is_patch_conv
    if mod.in_quantizer is not None or fed_by_norm or not exact_weight_ok(mod.w_quantizer):
        return False
    if mod.input_channel_scale() is not None or getattr(mod, 'bias_correction', None) is not None:
        return False
    return not isinstance(mod, QuantConv2d) or (is_patch_conv(mod) and mod.padding_mode == 'zeros')


def float64_gemm_on(mod) -> bool:
    """Whether ``mod`` runs its float-input GEMM in float64 now (``float_input_layer``; inference
    with its weight quantized)."""
    return (getattr(mod, '_float64_gemm', False) and not torch.is_grad_enabled()
            and mod.in_quantizer is None and mod.w_quantizer.mode == 'quant')


def float64_gemms_set(model: nn.Module) -> bool:
    """Whether ``set_exact_arithmetic(..., float_input_gemm='float64')`` marked any layer of
    ``model`` (``float_input_layer``)."""
    return any(getattr(m, '_float64_gemm', False) for m in model.modules())


def exact_arithmetic_on(model: nn.Module) -> bool:
    """Whether ``set_exact_arithmetic`` is in effect on ``model``."""
    return any(type(m) is RationalGELU or getattr(m, '_exact', None) is not None
               or getattr(m, '_float64_gemm', False) for m in model.modules())


@contextlib.contextmanager
def exact_arithmetic(model: nn.Module, float_input_gemm: str = 'float32'):
    """``set_exact_arithmetic(model, float_input_gemm=...)`` for the context; on exit the model
    is switched back to what it was (off, or on with the float-input GEMMs it had)."""
    was_on = exact_arithmetic_on(model)
    was_64 = float64_gemms_set(model)
    set_exact_arithmetic(model, float_input_gemm=float_input_gemm)
    try:
        yield model
    finally:
        if not was_on:
            set_exact_arithmetic(model, False)
        elif was_64 != (float_input_gemm == 'float64'):
            set_exact_arithmetic(model, float_input_gemm='float64' if was_64 else 'float32')


def exact_linear_constants(mod, unit: torch.Tensor):
    """(centred weight codes as float64 [N, ...], float32 Δ_x·Δ_w[c] [N]) of a quantized layer."""
    wq = mod.w_quantizer
    w = mod.weight.detach()
    codes = wq.quantize(w.float()).to(torch.float64)
    zp = wq.zero_point.detach().to(torch.float64)
    n = w.shape[0]
    shape = (n,) + (1,) * (w.dim() - 1)
    codes = codes - (zp.reshape(shape) if zp.numel() > 1 else zp.reshape(()))
    w_scale = wq.scale.detach().reshape(-1).to(torch.float32)
    w_scale = w_scale.expand(n) if w_scale.numel() == 1 else w_scale
    acc_scale = (unit.double() * w_scale.double()).float()
    return codes, acc_scale
