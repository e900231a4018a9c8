"""Checkpoint loading without arbitrary code execution."""
import os
from typing import Dict

import torch


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``.pth`` loaded with ``weights_only=True``.

    mmengine/mmdet checkpoints nest the weights under ``state_dict``; that is unwrapped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # pickle with non-tensor objects
        raise ValueError(
            f'{path}: cannot be loaded with weights_only=True ({type(err).__name__}: '
            f'{str(err).splitlines()[0][:200]}). fqvit-det never unpickles arbitrary objects; '
            'convert it once with tools/convert_checkpoint.py (which writes safetensors) or '
            'export only the tensors') from err
    for key in ('state_dict', 'model', 'module'):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f'{path}: expected a dict of tensors (optionally under "state_dict")')
    return obj


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str,
              strict: bool = True) -> None:
    """``load_state_dict`` with an error that says which keys/shapes do not match the model."""
    own = model.state_dict()
    # BatchNorm fills in a missing ``num_batches_tracked`` itself (it only matters for training
    # with momentum=None); exporters and converters often drop it.
    missing = [k for k in own if k not in state and not k.endswith('.num_batches_tracked')]
    unexpected = [k for k in state if k not in own]
    shape = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
             for k in own if k in state and state[k].shape != own[k].shape]
    if shape or (strict and (missing or unexpected)):
        raise ValueError(f'checkpoint {path} does not match the model: {len(missing)} missing '
                         f'(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), '
                         f'{len(shape)} shape mismatches (e.g. {shape[:2]})')
    model.load_state_dict(state, strict=strict)
