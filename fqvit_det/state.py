"""Save / load the calibrated state of a converted model (safetensors, atomic write).

The state is every quantizer buffer plus the parameters that calibration itself changed (the
LayerNorms and Linears rewritten by the RepQ reparameterization), so evaluating from a saved state
reproduces the calibrated model's outputs exactly without recalibrating.
"""
import json
import os
import tempfile
from typing import Dict

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .walk import named_quantizers, refresh, set_quant_mode
from .nn.modules import QuantLayerNorm

FORMAT = 'fqvit-det-quant-state/1'


def _reparam_modules(model):
    """Paths of the norms and Linears whose parameters the reparameterization rewrote."""
    return [p for norm, linears in getattr(model, 'fqvit_reparam_done', []) for p in [norm, *linears]]


def quant_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    state = {}
    for name, q in named_quantizers(model):
        for k, v in q.state_dict().items():
            state[f'{name}.{k}'] = v
    for path in _reparam_modules(model):
        for k, v in model.get_submodule(path).state_dict().items():
            if '_quantizer.' not in k and not k.startswith(('aq.',)):
                state[f'{path}.{k}'] = v
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_quant_state(model: nn.Module, path: str, spec=None, extra: dict = None) -> str:
    """Write atomically (temp file + rename) so a crash never leaves a half-written state."""
    meta = {'format': FORMAT,
            'reparam': json.dumps(getattr(model, 'fqvit_reparam_done', [])),
            'spec': json.dumps(None if spec is None else {
                'method': spec.method, 'w_bits': spec.w_bits, 'a_bits': spec.a_bits,
                'attn_bits': spec.attn_bits})}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.safetensors.tmp', dir=directory)
    os.close(fd)
    try:
        save_file(quant_state_dict(model), tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_metadata(path: str) -> dict:
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        return f.metadata() or {}


def load_quant_state(model: nn.Module, path: str, spec=None) -> None:
    """Load a state saved by ``save_quant_state`` into a model converted with the same recipe."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'quant state file not found: {path}')
    meta = read_metadata(path)
    if meta.get('format') != FORMAT:
        raise ValueError(f'{path}: not a fqvit-det quant state (format {meta.get("format")!r})')
    saved_spec = json.loads(meta.get('spec', 'null'))
    if spec is not None and saved_spec is not None:
        want = {'method': spec.method, 'w_bits': spec.w_bits, 'a_bits': spec.a_bits,
                'attn_bits': spec.attn_bits}
        if saved_spec != want:
            raise ValueError(f'{path} was calibrated with {saved_spec}, but the config asks for {want}')
    reparam = json.loads(meta.get('reparam', '[]'))
    # Reparameterized norms switched their output quantizer to per-tensor during calibration.
    for norm_path, _ in reparam:
        norm = model.get_submodule(norm_path)
        if isinstance(norm, QuantLayerNorm) and norm.out_quantizer is not None:
            norm.out_quantizer.ch_axis = None
            if hasattr(norm.out_quantizer, 'observer'):
                norm.out_quantizer.observer.ch_axis = None
    model.fqvit_reparam_done = [(n, list(ps)) for n, ps in reparam]
    state = load_file(path)
    # The reparameterization gives bias-free Linears (e.g. Swin's patch-merging reduction) a bias.
    for _, linear_paths in reparam:
        for lin_path in linear_paths:
            lin = model.get_submodule(lin_path)
            key = f'{lin_path}.bias'
            if getattr(lin, 'bias', None) is None and key in state:
                lin.bias = nn.Parameter(torch.zeros_like(state[key]), requires_grad=False)
    expected = set(quant_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f'{path} does not match this model: {len(missing)} missing keys '
                         f'(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})')
    device = next(model.parameters()).device
    result = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f'{path}: unexpected keys {result.unexpected_keys[:5]}')
    set_quant_mode(model, 'quant')
    refresh(model)
