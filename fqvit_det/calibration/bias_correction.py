"""Empirical bias correction: the per-channel mean shift that quantization causes in each layer's
output, measured on calibration images and removed by the layer's bias (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019, §4.2, empirical form;
Banner et al., NeurIPS 2019). A deployment flow adds the correction to the integer bias.

Sequential in one pass: all correction images run as one batch, first in float (each quantized
layer's output mean per channel), then quantized; in the quantized pass each layer, when it runs,
measures its output mean *given the already corrected layers before it* and sets
``bias_correction = float mean − quantized mean``. Correcting all layers at once from one
uncorrected pass instead over-corrects: a layer would also cancel the shift its predecessors
already remove (on YOLOX-Nano it diverges). A module called several times per forward (a head
shared across pyramid levels) is corrected from its first call.

Measured on YOLOX-Nano W8A8 (benchmarks/RESULTS.md): head-output SQNR 15.9 -> 22.1 dB, yet box AP
30.3 -> 29.4 and agreement AP50 99.2 -> 97.7: the per-channel mean over all positions is a
background statistic, and matching it moves the rare foreground responses. So it is off by
default (``quant_cfg.bias_correction=0``) and in the shipped configs.
"""
from typing import Callable, Dict, List

import torch
from torch import nn

from ..nn.modules import QuantConv2d, QuantLinear
from ..walk import set_quant_mode

CORRECTABLE = (QuantConv2d, QuantLinear)


def correctable_modules(model: nn.Module) -> List[tuple]:
    """(path, module) of the quantized convs / Linears (a weight or input quantizer)."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, CORRECTABLE) and (m.w_quantizer is not None or m.in_quantizer is not None)]


def channel_mean(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Mean per output channel: dim 1 of a conv output, the last dim of a Linear output."""
    axis = 1 if isinstance(module, nn.Conv2d) else out.dim() - 1
    dims = [d for d in range(out.dim()) if d != axis]
    return out.detach().float().mean(dim=dims)


def merge_batches(batches: list):
    """One batch holding all ``batches`` (tensors concatenated on dim 0, lists joined, dicts by
    key): the classification tensors and mmengine ``dict(inputs=[...], data_samples=[...])`` alike."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: merge_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, (list, tuple)):
        return [item for b in batches for item in b]
    raise TypeError(f'bias correction: cannot merge calibration batches of type {type(first).__name__}')


def correct_biases(model: nn.Module, batch, forward_fn: Callable) -> Dict[str, torch.Tensor]:
    """Set ``bias_correction`` of every quantized conv / Linear from one batch (module docstring).

    The model's quantizers must be calibrated; the model ends in quant mode. Returns the
    corrections by module path."""
    modules = correctable_modules(model)
    for _, m in modules:
        m.bias_correction = None
    float_means = {}

    def record(path):
        def hook(mod, inputs, out):
            if path not in float_means:
                float_means[path] = channel_mean(mod, out)
        return hook

    def correct(path):
        def hook(mod, inputs, out):
            if mod.bias_correction is not None:  # a later call of a shared module
                return None
            shift = float_means[path].to(out.device) - channel_mean(mod, out)
            mod.bias_correction = shift.to(out.dtype)
            view = (1, -1) + (1,) * (out.dim() - 2) if isinstance(mod, nn.Conv2d) else (-1,)
            return out + mod.bias_correction.reshape(view)
        return hook

    with torch.no_grad():
        set_quant_mode(model, 'float')
        handles = [m.register_forward_hook(record(p)) for p, m in modules]
        try:
            forward_fn(model, batch)
        finally:
            for h in handles:
                h.remove()
        set_quant_mode(model, 'quant')
        handles = [m.register_forward_hook(correct(p)) for p, m in modules if p in float_means]
        try:
            forward_fn(model, batch)
        finally:
            for h in handles:
                h.remove()
    return {p: m.bias_correction.detach().cpu() for p, m in modules if m.bias_correction is not None}


def bias_corrections(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The current corrections by module path (CPU copies)."""
    return {p: m.bias_correction.detach().cpu().clone() for p, m in correctable_modules(model)
            if getattr(m, 'bias_correction', None) is not None}


def set_bias_corrections(model: nn.Module, corrections: Dict[str, torch.Tensor], origin: str = '') -> None:
    """Replace all corrections (modules not named get none); checks paths and shapes first."""
    check_bias_corrections(model, corrections, origin)()


def check_bias_corrections(model: nn.Module, corrections: Dict[str, torch.Tensor], origin: str = ''):
    """Check paths and shapes (raising before any change); returns the function that sets them."""
    modules = dict(correctable_modules(model))
    for path, value in corrections.items():
        m = modules.get(path)
        if m is None:
            raise ValueError(f'{origin}bias correction for {path!r}: no quantized conv / Linear there')
        channels = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        if tuple(value.shape) != (channels,):
            raise ValueError(f'{origin}bias correction for {path!r} has shape {tuple(value.shape)}, '
                             f'the module has {channels} output channels')

    def apply():
        for path, m in modules.items():
            value = corrections.get(path)
            m.bias_correction = None if value is None else value.to(m.weight.device, m.weight.dtype)
    return apply
