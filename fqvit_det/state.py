"""Save / load the calibrated state of a converted model (safetensors, versioned, atomic write).

A state file holds
* every quantizer's calibrated parameters, as ``get_params()`` returns them
  (key ``quantizer/<module path>/<param>``),
* the module parameters the RepQ reparameterization rewrote (key ``module/<path>.<param>``),
and in its metadata the format version, the full resolved recipe (the ``QuantSpec`` as JSON:
every role's quantizer config, search settings, options), the reparameterized (norm, Linears)
pairs, the quantizer list, and a sha256 content hash over keys, dtypes, shapes, tensor bytes and
the recipe. Loading checks format, readability, hash, recipe and keys *before* touching the
model, so a refused file leaves the model as it was; evaluating from a loaded state reproduces the
calibrated model's outputs bit for bit without recalibrating.
"""
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Dict, List, Optional

import torch
from torch import nn

from .calibration.bias_correction import bias_corrections, check_bias_corrections
from .calibration.reparam import make_per_tensor, rewritten_module_paths
from .walk import named_quantizers, refresh, set_quant_mode

FORMAT = 'fqvit-det-quant-state/2'
Q_PREFIX, M_PREFIX = 'quantizer/', 'module/'
B_PREFIX = 'bias_correction/'  # per-channel output corrections of quantized convs / Linears


def recipe_of(spec) -> Optional[dict]:
    """The resolved recipe as plain JSON values (``QuantSpec.to_dict()`` when it has one)."""
    if spec is None:
        return None
    d = spec.to_dict() if hasattr(spec, 'to_dict') else dataclasses.asdict(spec)
    return json.loads(json.dumps(d, sort_keys=True))


_ABSENT = object()


def _diff(saved, wanted, key: str, out: List[str]) -> None:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for k in sorted(set(saved) | set(wanted)):
            _diff(saved.get(k, _ABSENT), wanted.get(k, _ABSENT), f'{key}.{k}' if key else str(k), out)
    elif saved != wanted:
        show = lambda v: 'absent' if v is _ABSENT else json.dumps(v, sort_keys=True)  # noqa: E731
        out.append(f'{key}: saved {show(saved)}, config asks {show(wanted)}')


def recipe_differences(saved: dict, wanted: dict) -> List[str]:
    """``'roles.ln_output.bits: saved 4, config asks 8'`` lines, sorted by key."""
    out = []
    _diff(saved, wanted, '', out)
    return out


def content_hash(tensors: Dict[str, torch.Tensor], recipe_json: str, reparam_json: str) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu()
        h.update(f'{key}|{t.dtype}|{tuple(t.shape)}|'.encode())
        if t.numel():  # a fresh dense copy: expanded parameters (stride 0) cannot be viewed as bytes
            dense = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)
            h.update(dense.view(torch.uint8).numpy().tobytes())
    h.update(recipe_json.encode())
    h.update(reparam_json.encode())
    return h.hexdigest()


def quant_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors a state file holds (on the CPU, contiguous)."""
    state = {}
    for name, q in named_quantizers(model):
        for k, v in q.get_params().items():
            state[f'{Q_PREFIX}{name}/{k}'] = v
    for path in rewritten_module_paths(model):
        for k, v in model.get_submodule(path).named_parameters(recurse=False):
            state[f'{M_PREFIX}{path}.{k}'] = v
    for path, v in bias_corrections(model).items():
        state[f'{B_PREFIX}{path}'] = v
    return {k: torch.empty(v.shape, dtype=v.dtype).copy_(v.detach()) for k, v in state.items()}


def save_quant_state(model: nn.Module, path: str, spec=None, extra: dict = None) -> str:
    """Write atomically (temp file + rename) so a crash never leaves a half-written state."""
    from safetensors.torch import save_file
    tensors = quant_state_dict(model)
    recipe_json = json.dumps(recipe_of(spec), sort_keys=True)
    reparam_json = json.dumps([[n, list(ps)] for n, ps in getattr(model, 'fqvit_reparam_done', [])])
    meta = {'format': FORMAT, 'recipe': recipe_json, 'reparam': reparam_json,
            'quantizers': json.dumps([n for n, _ in named_quantizers(model)]),
            'sha256': content_hash(tensors, recipe_json, reparam_json)}
    meta.update({f'extra.{k}': json.dumps(v) for k, v in (extra or {}).items()})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.safetensors.tmp', dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _where(path: str, origin: Optional[str]) -> str:
    return f'quant state {path!r}' + (f' (given by {origin})' if origin else '')


def read_quant_state(path: str, origin: Optional[str] = None):
    """(tensors, metadata) of a state file, verified (format, readability, hash); ValueError otherwise."""
    from safetensors import safe_open
    where = _where(path, origin)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{where} not found')
    try:
        tensors = {}
        with safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError, ...)
        raise ValueError(f'{where} cannot be read (truncated or not a safetensors file): '
                         f'{type(err).__name__}: {err}') from err
    if meta.get('format') != FORMAT:
        raise ValueError(f'{where} is not a {FORMAT} file (format {meta.get("format")!r}); '
                         'recalibrate to write a current state file')
    for key in ('recipe', 'reparam', 'quantizers', 'sha256'):
        if key not in meta:
            raise ValueError(f'{where}: metadata key {key!r} missing')
    digest = content_hash(tensors, meta['recipe'], meta['reparam'])
    if digest != meta['sha256']:
        raise ValueError(f'{where} is corrupted: its content hash is {digest}, the file records '
                         f'{meta["sha256"]}')
    return tensors, meta


def read_metadata(path: str) -> dict:
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        return f.metadata() or {}


def load_quant_state(model: nn.Module, path: str, spec=None, origin: Optional[str] = None) -> None:
    """Load a state saved by ``save_quant_state`` into a model converted with the same recipe.

    ``origin`` names where the path came from in error messages (e.g. ``'--quant-state'``).
    Everything is checked before the model changes; on any error the model is untouched."""
    where = _where(path, origin)
    tensors, meta = read_quant_state(path, origin)
    saved_recipe = json.loads(meta['recipe'])
    wanted = recipe_of(spec)
    if wanted is not None and saved_recipe is not None:
        diff = recipe_differences(saved_recipe, wanted)
        if diff:
            raise ValueError(f'{where} was calibrated with a different recipe: ' + '; '.join(diff[:8])
                             + (f' (and {len(diff) - 8} more)' if len(diff) > 8 else ''))
    reparam = [(n, list(ps)) for n, ps in json.loads(meta['reparam'])]
    quantizers = dict(named_quantizers(model))
    saved_names = json.loads(meta['quantizers'])
    if sorted(saved_names) != sorted(quantizers):
        missing = sorted(set(quantizers) - set(saved_names))
        unexpected = sorted(set(saved_names) - set(quantizers))
        raise ValueError(f'{where} does not match this model: quantizers missing from the file '
                         f'{missing[:3]}, in the file but not in the model {unexpected[:3]}')
    params = {n: {} for n in saved_names}
    modules, corrections = {}, {}
    for key, value in tensors.items():
        if key.startswith(B_PREFIX):
            corrections[key[len(B_PREFIX):]] = value
        elif key.startswith(Q_PREFIX):
            name, _, param = key[len(Q_PREFIX):].rpartition('/')
            if name not in params:
                raise ValueError(f'{where}: tensor {key!r} belongs to no listed quantizer')
            params[name][param] = value
        elif key.startswith(M_PREFIX):
            modules[key[len(M_PREFIX):]] = value
        else:
            raise ValueError(f'{where}: unexpected tensor key {key!r}')
    expected_modules = set()
    for norm_path, linear_paths in reparam:
        for p in [norm_path, *linear_paths]:
            try:
                mod = model.get_submodule(p)
            except AttributeError:
                raise ValueError(f'{where}: reparameterized module {p!r} is not in this model') from None
            expected_modules.update(f'{p}.{k}' for k in ('weight', 'bias')
                                    if getattr(mod, k, None) is not None or f'{p}.{k}' in modules)
    if set(modules) != expected_modules:
        raise ValueError(f'{where}: reparameterized parameters do not match this model: missing '
                         f'{sorted(expected_modules - set(modules))[:3]}, unexpected '
                         f'{sorted(set(modules) - expected_modules)[:3]}')
    for key, value in modules.items():
        path, _, attr = key.rpartition('.')
        current = getattr(model.get_submodule(path), attr, None)
        if current is not None and tuple(current.shape) != tuple(value.shape):
            raise ValueError(f'{where}: {key} has shape {tuple(value.shape)} in the file, '
                             f'{tuple(current.shape)} in this model')

    set_corrections = check_bias_corrections(model, corrections, f'{where}: ')

    # --- validated: now change the model ----------------------------------------------------
    for norm_path, _ in reparam:  # reparameterized norms quantize their output per tensor
        outq = getattr(model.get_submodule(norm_path), 'out_quantizer', None)
        if outq is not None:
            make_per_tensor(outq)
    model.fqvit_reparam_done = reparam
    with torch.no_grad():
        for key, value in modules.items():
            path, _, attr = key.rpartition('.')
            mod = model.get_submodule(path)
            current = getattr(mod, attr, None)
            device = _device(model)
            if current is None:  # the reparameterization gave a bias-free Linear a bias
                setattr(mod, attr, nn.Parameter(value.to(device), requires_grad=False))
            else:
                current.copy_(value.to(current.device))
    for name, p in params.items():
        quantizers[name].set_params(**p)
    set_corrections()
    set_quant_mode(model, 'quant')
    refresh(model)


def _device(model):
    for t in model.parameters():
        return t.device
    return torch.device('cpu')
