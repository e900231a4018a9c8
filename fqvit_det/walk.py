"""Walking a converted model: its quantizers and their modes.

Shared by the calibration runner, the search, the state file and the report (none of which import
each other for it).
"""
from torch import nn

from .nn.modules import QuantModule, _WeightQuantMixin
from .quantizers import Quantizer


def named_quantizers(model: nn.Module):
    """Top-level quantizers (not observers nested in them), with their module paths."""
    out, seen = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, Quantizer) and not any(name.startswith(p + '.') for p in seen):
            out.append((name, mod))
            seen.add(name)
    return out


def weight_quantizer_ids(model: nn.Module):
    return {id(m.w_quantizer) for m in model.modules()
            if isinstance(m, _WeightQuantMixin) and m.w_quantizer is not None}


def activation_quantizers(model: nn.Module):
    wids = weight_quantizer_ids(model)
    return [(n, q) for n, q in named_quantizers(model) if id(q) not in wids]


def set_quant_mode(model: nn.Module, mode: str) -> None:
    """'float' | 'quant' for every quantizer (weights included)."""
    for _, q in named_quantizers(model):
        q.set_mode(mode)
    refresh(model)


def refresh(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantModule):
            m.refresh()


def feeding_norms(model: nn.Module):
    """{Linear path: path of the LayerNorm whose quantized output is that Linear's input}, from the
    converter's ``model.fqvit_reparam_pairs``."""
    out = {}
    for norm_path, linear_paths in getattr(model, 'fqvit_reparam_pairs', []) or []:
        for p in linear_paths:
            out[p] = norm_path
    return out
