"""RepQ-ViT scale reparameterization of post-LayerNorm activations (pure tensor functions).

Calibration gives the LayerNorm output y a channel-wise quantizer (Δ_c, z_c):
    q_c = clamp(round(y_c / Δ_c) + z_c, q_min, q_max).
We want a layer-wise quantizer (Δ̃, z̃) on a modified LayerNorm output y' that yields the SAME codes.
Since an integer shift commutes with rounding,
    round(y'_c / Δ̃) + z̃ = round(y_c / Δ_c) + z_c   ⇐   y'_c = y_c / r_c − b_c,
    r_c = Δ_c / Δ̃,   b_c = (z̃ − z_c) Δ̃  ( = (−z_c Δ_c)/r_c − (−z̃ Δ̃) ).
The clamp bounds are equal on both sides, so codes match exactly (up to float rounding of the
division). y' is what a LayerNorm with affine γ'_c = γ_c / r_c, β'_c = β_c / r_c − b_c produces.
The next Linear sees y = r ⊙ (y' + b), so W y + bias = W' y' + (bias + W' b) with
W'[:, c] = W[:, c] · r_c: the network is unchanged in float, and the dequantized values satisfy
ŷ_c = r_c (ŷ'_c + b_c), i.e. channel-wise and layer-wise quantization agree channel by channel.

Choices:
* Δ̃ = mean_c Δ_c and z̃ = round(mean_c z_c). We ROUND the target zero point so the resulting
  layer-wise quantizer has an integer zero point (the official RepQ-ViT code keeps the fractional
  mean); any z̃ keeps the transform exact because b_c absorbs z_c − z̃.
* Degenerate channels: a channel whose Δ_c is at the scale floor (``min_scale``; its observed range
  was zero, e.g. LayerNorm weight and bias exactly 0 — real DeiT-Tiny has such channels) would get
  r_c ≈ 1e-6 and blow γ_c/r_c, β_c/r_c up. Such channels are left untouched (r_c = 1, b_c = 0) and
  excluded from the means. Their values are (numerically) zero, which both quantizers represent
  exactly, so the layer-wise quantizer still reproduces them.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import MIN_SCALE

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def repq_factors(scale: torch.Tensor, zero_point: torch.Tensor, min_scale: float = MIN_SCALE):
    """(r [C], b [C], Δ̃, z̃) in float64 for channel-wise (Δ_c, z_c); see the module docstring."""
    scale = torch.as_tensor(scale).detach().to(torch.float64).reshape(-1)
    zero_point = torch.as_tensor(zero_point).detach().to(torch.float64).reshape(-1)
    if zero_point.numel() == 1 and scale.numel() > 1:
        zero_point = zero_point.expand_as(scale)
    if zero_point.shape != scale.shape:
        raise ValueError(f'repq: scale {tuple(scale.shape)} and zero_point '
                         f'{tuple(zero_point.shape)} differ in size')
    if not (torch.isfinite(scale).all() and torch.isfinite(zero_point).all()):
        raise ValueError('repq: scale / zero_point contain NaN or Inf')
    if (scale <= 0).any():
        raise ValueError('repq: scales must be positive')
    valid = scale > min_scale * (1 + 1e-6)
    if valid.any():
        target_scale = scale[valid].mean()
        target_zp = torch.round(zero_point[valid].mean())
    else:  # every channel is degenerate: nothing to rescale
        target_scale = scale.mean()
        target_zp = torch.round(zero_point.mean())
    r = torch.where(valid, scale / target_scale, torch.ones_like(scale))
    b = torch.where(valid, (target_zp - zero_point) * target_scale, torch.zeros_like(scale))
    return r, b, target_scale, target_zp


def _per_in_channel(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Shape a [C] vector to broadcast over a weight's input-channel axis (dim 1)."""
    return v.reshape(1, -1, *([1] * (w.dim() - 2)))


def repq_reparameterize(ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                        lin_weight: TensorOrList, lin_bias, scale: torch.Tensor,
                        zero_point: torch.Tensor, min_scale: float = MIN_SCALE):
    """RepQ-ViT reparameterization of LayerNorm → Linear(s) given the LN output's channel-wise (Δ, z).

    Args:
        ln_weight, ln_bias: LayerNorm affine γ, β of shape [C] (``None`` = ones / zeros; the results
            are tensors in any case, so the norm must be able to hold an affine transform).
        lin_weight: weight [out, C] (or a 1×1 conv [out, C, 1, 1]) of the Linear fed by the norm, or a
            list of such weights when several layers consume the same norm output.
        lin_bias: the matching bias [out] / ``None``, or a list of them (a bias is always returned,
            because the folded offset W'·b is generally non-zero).
        scale, zero_point: channel-wise Δ_c, z_c of the LN output quantizer, shape [C].

    Returns ``(new_ln_weight, new_ln_bias, new_lin_weight, new_lin_bias, target_scale,
    target_zero_point)``; the Linear entries are lists iff ``lin_weight`` was a list. Inputs are
    not modified; all arithmetic is float64, results are cast back to the inputs' dtypes.
    """
    r, b, target_scale, target_zp = repq_factors(scale, zero_point, min_scale)
    C = r.numel()
    single = torch.is_tensor(lin_weight)
    weights = [lin_weight] if single else list(lin_weight)
    if single:
        biases = [lin_bias]
    else:
        biases = [None] * len(weights) if lin_bias is None else list(lin_bias)
    if len(biases) != len(weights):
        raise ValueError(f'repq: {len(weights)} weights but {len(biases)} biases')
    ref = next((t for t in (ln_weight, ln_bias, *weights) if t is not None), None)
    ln_dtype = (ln_weight if ln_weight is not None else
                ln_bias if ln_bias is not None else weights[0]).dtype
    device = ref.device if ref is not None else None
    r, b = r.to(device), b.to(device)

    gamma = (torch.ones(C, dtype=torch.float64, device=device) if ln_weight is None
             else ln_weight.detach().to(torch.float64).reshape(-1))
    beta = (torch.zeros(C, dtype=torch.float64, device=device) if ln_bias is None
            else ln_bias.detach().to(torch.float64).reshape(-1))
    if gamma.numel() != C or beta.numel() != C:
        raise ValueError(f'repq: LayerNorm has {gamma.numel()} channels, quantizer has {C}')
    new_gamma = (gamma / r).to(ln_dtype)
    new_beta = (beta / r - b).to(ln_dtype)

    new_ws, new_bs = [], []
    for w, bias in zip(weights, biases):
        if w.dim() < 2 or w.shape[1] != C or any(s != 1 for s in w.shape[2:]):
            raise ValueError(f'repq: weight of shape {tuple(w.shape)} is not a Linear / 1x1 conv '
                             f'with {C} input channels')
        w64 = w.detach().to(torch.float64)
        new_w = w64 * _per_in_channel(r, w64)
        offset = (new_w * _per_in_channel(b, w64)).sum(dim=tuple(range(1, w64.dim())))
        bias64 = (torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None
                  else bias.detach().to(torch.float64))
        new_ws.append(new_w.to(w.dtype))
        new_bs.append((bias64 + offset).to(bias.dtype if bias is not None else w.dtype))

    out_device = scale.device if torch.is_tensor(scale) else None
    target_scale = target_scale.to(dtype=torch.float32, device=out_device)
    target_zp = target_zp.to(dtype=torch.float32, device=out_device)
    if single:
        return new_gamma, new_beta, new_ws[0], new_bs[0], target_scale, target_zp
    return new_gamma, new_beta, new_ws, new_bs, target_scale, target_zp


@torch.no_grad()
def repq_reparameterize_modules(norm: nn.Module, linears: Sequence[nn.Module], scale: torch.Tensor,
                                zero_point: torch.Tensor,
                                min_scale: float = MIN_SCALE) -> Tuple[torch.Tensor, torch.Tensor]:
    """In-place version on modules: ``norm`` has ``weight``/``bias`` parameters (elementwise affine),
    each of ``linears`` has ``weight``/``bias`` (a missing Linear bias is created). Returns the
    layer-wise (Δ̃, z̃) for the norm output quantizer. The weight quantizers of ``linears`` must be
    re-calibrated afterwards (their weights changed)."""
    if getattr(norm, 'weight', None) is None:
        raise ValueError('repq: the norm has no affine weight to absorb the channel scales')
    linears = list(linears)
    g, bt, ws, bs, t_scale, t_zp = repq_reparameterize(
        norm.weight, getattr(norm, 'bias', None), [m.weight for m in linears],
        [m.bias for m in linears], scale, zero_point, min_scale)
    norm.weight.copy_(g)
    if getattr(norm, 'bias', None) is None:
        norm.bias = nn.Parameter(bt.clone(), requires_grad=norm.weight.requires_grad)
    else:
        norm.bias.copy_(bt)
    for m, w, b in zip(linears, ws, bs):
        m.weight.copy_(w)
        if m.bias is None:
            m.bias = nn.Parameter(b.clone(), requires_grad=m.weight.requires_grad)
        else:
            m.bias.copy_(b)
    return t_scale, t_zp
