"""RepQ-ViT reparameterization step of the runner (the tensor math is ``quantizers.reparam``).

The converter records ``model.fqvit_reparam_pairs``: (LayerNorm path, [paths of the Linears it
feeds]). For each pair the per-channel LayerNorm-output quantizer (Δ_c, z_c) becomes one
per-tensor quantizer (Δ̃, z̃), the channel factors move into the norm's affine parameters and the
Linears' weights (RepQ-ViT §4.2), and the Linears' weight quantizers are recalibrated.
``model.fqvit_reparam_done`` records what was rewritten (the state file saves those parameters).
"""
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..nn.modules import QuantLayerNorm
from ..quantizers import UniformQuantizer


def reparam_error(norm_path: str, why: str) -> ValueError:
    return ValueError(
        f'RepQ reparameterization of {norm_path}: {why}. It needs the LayerNorm-output role '
        "(quant_cfg.roles.ln_output) to be a per-channel UniformQuantizer, e.g. "
        "roles=dict(ln_output=dict(type='UniformQuantizer', bits=<a_bits>, ch_axis=-1, "
        "observer=dict(type='PercentileSearchObserver'))); or set quant_cfg.reparam=False.")


def check_reparam_pair(model: nn.Module, norm_path: str) -> UniformQuantizer:
    norm = model.get_submodule(norm_path)
    if not isinstance(norm, QuantLayerNorm):
        raise reparam_error(norm_path, f'the module is a {type(norm).__name__}, not a QuantLayerNorm')
    outq = norm.out_quantizer
    if not isinstance(outq, UniformQuantizer):
        raise reparam_error(norm_path, 'its output quantizer is '
                            + ('missing (the role is None)' if outq is None else type(outq).__name__))
    if outq.ch_axis is None:
        raise reparam_error(norm_path, 'its output quantizer is per-tensor (ch_axis=None)')
    return outq


def make_per_tensor(q: nn.Module) -> None:
    """After the reparameterization the norm output is quantized per tensor (its observer too)."""
    for mod in q.modules():
        if hasattr(mod, 'ch_axis'):
            mod.ch_axis = None


def reparameterize(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """Rewrite every recorded (norm, Linears) pair; raises (before changing anything) when a
    norm's output quantizer is not per-channel uniform."""
    from ..quantizers.reparam import repq_reparameterize_modules
    pairs = list(getattr(model, 'fqvit_reparam_pairs', []))
    for norm_path, _ in pairs:
        check_reparam_pair(model, norm_path)
    done = []
    for norm_path, linear_paths in pairs:
        norm = model.get_submodule(norm_path)
        outq = norm.out_quantizer
        params = outq.get_params()
        linears = [model.get_submodule(p) for p in linear_paths]
        with torch.no_grad():
            scale, zero_point = repq_reparameterize_modules(norm, linears, params['scale'],
                                                            params['zero_point'])
        for lin in linears:
            lin.calibrate_weight()  # the weights changed: the only lossy step of RepQ
        make_per_tensor(outq)
        outq.set_params(scale=scale, zero_point=zero_point)
        done.append((norm_path, list(linear_paths)))
    model.fqvit_reparam_done = done
    return done


def rewritten_module_paths(model: nn.Module) -> List[str]:
    return [p for norm, linears in getattr(model, 'fqvit_reparam_done', []) for p in [norm, *linears]]


def rewritten_module_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The reparameterized modules' own parameters (not their quantizers'), on the CPU."""
    out = {}
    for path in rewritten_module_paths(model):
        for name, p in model.get_submodule(path).named_parameters(recurse=False):
            out[f'{path}.{name}'] = p.detach().cpu().contiguous()
    return out
