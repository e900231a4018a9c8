"""Integer model export: one safetensors file (no pickle), loadable with torch + safetensors + timm.

The file holds the integer model's state (small tensors concatenated per dtype, see
``SMALL_NUMEL``; ``read_integer`` unpacks them): int8 weight codes (4-bit codes packed two per byte with
one int8 offset, or one per channel), float32 biases and scales or int32 dyadic multipliers, and the
remaining float tensors (LayerNorm, position embedding, quantizers of the simulated parts); the
large code tensors are Huffman-coded (``entropy_code``, lossless). Its
metadata holds what rebuilds the module graph before the tensors are loaded: the timm
architecture, the resolved recipe (``QuantSpec``), the integer plan (path, kind, constructor
arguments) and the quantizer modes. ``load_integer`` reproduces the saved model's outputs bit for
bit. Written to a temporary file in the target directory, then renamed.
"""
import base64
import json
import math
import os
import tempfile
import zlib
from typing import Dict

import torch
from torch import nn

from .convert import adopt_norm_targets, finish_integer, install_integer_attention
from .linear import IntegerLinear, IntegerPatchEmbed

FORMAT = 'fqvit-det-integer/3'
# /1: one entry per tensor, plain JSON metadata; /2: no entropy-coded tensors
FORMATS = ('fqvit-det-integer/1', 'fqvit-det-integer/2', FORMAT)
PACK_SUFFIX, LOW_SUFFIX = '.packed4', '.low4'
# /2: tensors of at most SMALL_NUMEL elements (scales, biases, LayerNorm parameters, constants)
# are concatenated per dtype into one flat tensor each, and the metadata (rebuild recipe and the
# manifest of those small tensors) is one zlib-compressed JSON: the safetensors header would
# otherwise hold ~800 entries (84–104 KB for DeiT-Tiny, 1.5–2.5 % of the file)
SMALL_NUMEL = 4096
SMALL_PREFIX = '__small__.'


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace('torch.', '')


def _pack_small(state: Dict[str, torch.Tensor]):
    """(tensors, manifest): the tensors of at most ``SMALL_NUMEL`` elements concatenated, flat, per
    dtype into ``__small__.<dtype>``; manifest rows [key, dtype, shape, offset]."""
    groups, manifest, out = {}, [], {}
    for key in sorted(state):
        t = state[key]
        if t.numel() > SMALL_NUMEL:
            out[key] = t
            continue
        dt = _dtype_name(t)
        parts = groups.setdefault(dt, [])
        manifest.append([key, dt, list(t.shape), sum(x.numel() for x in parts)])
        parts.append(t.reshape(-1))
    for dt, parts in groups.items():
        out[SMALL_PREFIX + dt] = torch.cat(parts)
    return out, manifest


def _unpack_small(tensors: Dict[str, torch.Tensor], manifest) -> Dict[str, torch.Tensor]:
    state = {k: v for k, v in tensors.items() if not k.startswith(SMALL_PREFIX)}
    for key, dt, shape, offset in manifest:
        flat = tensors[SMALL_PREFIX + dt]
        state[key] = flat[offset:offset + math.prod(shape)].reshape(shape).clone()
    return state


# /3: int8 / uint8 code tensors of more than SMALL_NUMEL elements are stored as a zlib stream of
# DEFLATE's Huffman-only strategy (no LZ matching: weight codes have no repeats worth matching, and
# the strategy is 3× faster than level 9 with a smaller result): an entropy code of the code bytes.
# Weight codes are far from uniform over their range (bell-shaped per channel): DeiT-Tiny's files
# shrink by 9 % (8-bit FQ-ViT) to 38 % (6-bit PTQ4ViT, codes in int8 bytes), losslessly.
HUFFMAN_DTYPES = {'int8': torch.int8, 'uint8': torch.uint8}


def entropy_code(tensors: Dict[str, torch.Tensor]):
    """(tensors, manifest): each int8 / uint8 tensor of more than ``SMALL_NUMEL`` elements replaced
    by the uint8 bytes of its Huffman-only zlib stream where that is smaller; manifest rows [key,
    dtype, shape]. ``entropy_decode`` inverts it."""
    out, manifest = {}, []
    for key in sorted(tensors):
        t = tensors[key]
        dt = _dtype_name(t)
        if dt not in HUFFMAN_DTYPES or t.numel() <= SMALL_NUMEL:
            out[key] = t
            continue
        coder = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
        data = coder.compress(t.contiguous().numpy().tobytes()) + coder.flush()
        if len(data) >= t.numel():
            out[key] = t
            continue
        out[key] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        manifest.append([key, dt, list(t.shape)])
    return out, manifest


def entropy_decode(tensors: Dict[str, torch.Tensor], manifest, where: str) -> Dict[str, torch.Tensor]:
    out = dict(tensors)
    for key, dt, shape in manifest:
        if key not in out or dt not in HUFFMAN_DTYPES:
            raise ValueError(f'{where}: entropy-coded tensor {key!r} ({dt}) is missing or of an unknown dtype')
        try:
            raw = zlib.decompress(out[key].numpy().tobytes())
        except zlib.error as err:
            raise ValueError(f'{where}: entropy-coded tensor {key!r} is corrupt ({err})') from None
        if len(raw) != math.prod(shape):
            raise ValueError(f'{where}: entropy-coded tensor {key!r} decodes to {len(raw)} bytes, '
                             f'expected {math.prod(shape)} for shape {shape}')
        out[key] = torch.frombuffer(bytearray(raw), dtype=HUFFMAN_DTYPES[dt]).reshape(shape)
    return out


def read_integer(path: str):
    """(metadata dict of JSON strings, tensors by state key) of a ``save_integer`` file,
    entropy-coded tensors decoded and small ones unpacked; a clear error for other files."""
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        meta = f.metadata() or {}
        if meta.get('format') not in FORMATS:
            raise ValueError(f'{path}: not an integer export (format {meta.get("format")!r}, '
                             f'expected one of {FORMATS})')
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta['format'] != FORMATS[0]:
        try:
            meta = json.loads(zlib.decompress(base64.b64decode(meta['bundle'])).decode())
        except (KeyError, ValueError, zlib.error) as err:
            raise ValueError(f'{path}: unreadable integer-export metadata ({err})') from None
        tensors = entropy_decode(tensors, json.loads(meta.get('huffman', '[]')), path)
        tensors = _unpack_small(tensors, json.loads(meta.pop('small')))
    return meta, tensors


def pack_int4(codes: torch.Tensor):
    """(packed uint8 [N, ⌈K/2⌉], low int8) for int8 codes [N, K] spanning ≤ 16 values per row:
    nibble = code − low (0 … 15), two per byte (even column in the low nibble). ``low`` is one
    offset (0-dim) when all rows fit one 16-value window (symmetric 4-bit weights), else one per
    row [N]."""
    c16 = codes.to(torch.int16)
    low = c16.amin()
    if int(c16.amax()) - int(low) > 15:
        low = c16.amin(dim=1)
    nib = c16 - low.reshape(-1, 1)
    if int(nib.max()) > 15:
        raise ValueError('pack_int4: a row spans more than 16 code values')
    if nib.shape[1] % 2:
        nib = torch.cat([nib, torch.zeros_like(nib[:, :1])], 1)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    return packed, low.to(torch.int8)


def unpack_int4(packed: torch.Tensor, low: torch.Tensor, k: int) -> torch.Tensor:
    p = packed.to(torch.int16)
    nib = torch.stack([p & 15, p >> 4], dim=2).reshape(p.shape[0], -1)[:, :k]
    return (nib + low.to(torch.int16).reshape(-1, 1)).to(torch.int8)


def _plan_entries(model: nn.Module):
    entries = []
    for path, kind, norm_path in getattr(model, 'fqvit_integer_plan', []):
        mod = model.get_submodule(path)
        lin = mod.linear if kind == 'patch' else mod
        extra = dict(patch_size=list(mod.patch_size), out_channels=mod.out_channels) if kind == 'patch' else {}
        norm = model.get_submodule(norm_path) if norm_path else None
        entries.append(dict(path=path, kind=kind, norm=norm_path, config=lin.config(),
                            drop_norm_quantizer=bool(norm is not None and norm.out_quantizer is None),
                            **extra))
    return entries


def integer_state(model: nn.Module, coded=None) -> Dict[str, torch.Tensor]:
    """The tensors of the export: the state dict with 4-bit weight codes packed, dyadic
    multipliers narrowed to int32, buffers derived from others left out (``IntegerLinear``'s
    zero-point terms, recomputed on loading), float tensors that a uniform quantizer reads whole
    stored as its codes (``coded``: ``coded_tensors(model)``, computed here when not given) and small
    int64 buffers as int8."""
    state, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:          # a module reached by two paths (IntegerAttention's quantizers)
            continue
        seen.add(id(v))
        state[k] = v.detach().cpu().contiguous()
    for path, mod in model.named_modules():
        if not isinstance(mod, IntegerLinear):
            continue
        key = f'{path}.weight_codes'
        if mod.w_bits <= 4:
            packed, low = pack_int4(state.pop(key))
            state[key + PACK_SUFFIX], state[key + LOW_SUFFIX] = packed, low
        mk = f'{path}.multiplier'
        if state[mk].numel():
            state[mk] = state[mk].to(torch.int32)      # M < 2^31
        for name in IntegerLinear.DERIVED:
            state.pop(f'{path}.{name}', None)
    for key, _, codes in (coded_tensors(model) if coded is None else coded):
        state.pop(key)
        state[key + CODES_SUFFIX] = codes
    for key in [k for k, v in state.items() if v.numel() == 0]:
        state.pop(key)      # empty buffers (constants of the other requantization mode)
    for key, v in list(state.items()):       # PTF factors and other small integers: int8 on disk
        if v.dtype == torch.int64 and v.numel() > 1 and int(v.min()) >= -128 and int(v.max()) <= 127:
            state[key] = v.to(torch.int8)
            state[key + NARROW_SUFFIX] = torch.zeros(0, dtype=torch.int64)
    return state


CODES_SUFFIX, NARROW_SUFFIX = '.codes', '.int64'


def coded_tensors(model: nn.Module):
    """[(state key, quantizer path, codes)]: float tensors that a uniform quantizer in 'quant'
    mode reads whole (the position embedding under FQ-ViT's ``qact_pos``, the weights of layers
    left simulated), stored as their codes. Reloaded as the codes' values, which the quantizer maps
    to themselves, so the outputs stay bit-identical (checked here; a tensor that fails stays
    float)."""
    from ..nn.modules import QuantConv2d, QuantLinear
    from ..quantizers.uniform import UniformQuantizer
    pairs = []
    if getattr(model, 'pos_embed', None) is not None:
        pairs.append(('pos_embed', 'pos_embed_quantizer'))
    for path, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantConv2d)) and mod.input_channel_scale() is None:
            pairs.append((f'{path}.weight', f'{path}.w_quantizer'))
    out = []
    for key, qpath in pairs:
        try:
            q = model.get_submodule(qpath)
        except AttributeError:
            continue
        if type(q) is not UniformQuantizer or q.mode != 'quant' or q.bits > 8:
            continue
        t = model.get_parameter(key).detach()
        codes = q.quantize(t)
        if not torch.equal(q.fake_quant(q.dequantize(codes)), q.fake_quant(t)):
            continue
        dtype = (torch.int16 if q.qmax > 255 or q.qmin < -128 else
                 torch.uint8 if q.qmin >= 0 else torch.int8)
        out.append((key, qpath, codes.to(dtype).cpu()))
    return out


def save_integer(model: nn.Module, path: str, arch: dict, spec, entropy_coding: bool = True) -> int:
    """Write ``model`` (from ``to_integer``) to ``path``; returns the file size in bytes.

    ``arch``: ``dict(model_name=..., **timm kwargs)`` that ``timm.create_model`` rebuilds the float
    skeleton from; ``spec``: the ``QuantSpec`` the model was calibrated with. ``entropy_coding``:
    Huffman-code the large code tensors (lossless, see ``entropy_code``); off, every tensor is
    stored as it is used (memory-mappable codes)."""
    from safetensors.torch import save_file

    from ..walk import named_quantizers
    if not getattr(model, 'fqvit_integer_plan', None):
        raise ValueError('save_integer: the model has no integer plan; convert it with to_integer first')
    if not isinstance(arch, dict) or not isinstance(arch.get('model_name'), str):
        raise ValueError(f"save_integer: arch must be dict(model_name=<timm name>, ...), got {arch!r}")
    coded = coded_tensors(model)
    meta = dict(format=FORMAT, arch=json.dumps(arch, sort_keys=True),
                recipe=json.dumps(spec.to_dict(), sort_keys=True),
                plan=json.dumps(_plan_entries(model)),
                coded=json.dumps({key: qpath for key, qpath, _ in coded}),
                attention=json.dumps([dict(path=p, config=model.get_submodule(p).core.config())
                                      for p in getattr(model, 'fqvit_integer_attention', [])]),
                reparam=json.dumps([n for n, _ in getattr(model, 'fqvit_reparam_done', []) or []]),
                modes=json.dumps({n: q.mode for n, q in named_quantizers(model)}))
    tensors, manifest = _pack_small(integer_state(model, coded))
    meta['small'] = json.dumps(manifest)
    if entropy_coding:
        tensors, huffman = entropy_code(tensors)
        meta['huffman'] = json.dumps(huffman)
    bundle = base64.b64encode(zlib.compress(json.dumps(meta, sort_keys=True).encode(), 9)).decode()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.integer-', suffix='.safetensors', dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(format=FORMAT, bundle=bundle))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def _set_child(model, path, new):
    parent_path, _, name = path.rpartition('.')
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def load_integer(path: str, device='cpu') -> nn.Module:
    """The integer model saved by ``save_integer`` (eval mode, on ``device``)."""
    import timm

    from ..calibration.reparam import make_per_tensor
    from ..convert import quantize_model
    from ..presets import QuantSpec
    meta, state = read_integer(path)
    arch = json.loads(meta['arch'])
    name = arch.pop('model_name')
    model = timm.create_model(name, pretrained=False, **arch).eval()
    quantize_model(model, QuantSpec.from_dict(json.loads(meta['recipe'])))
    for norm_path in json.loads(meta['reparam']):
        q = getattr(model.get_submodule(norm_path), 'out_quantizer', None)
        if q is not None:
            make_per_tensor(q)
    model.fqvit_reparam_done = [(n, []) for n in json.loads(meta['reparam'])]
    adopt_norm_targets(model)
    attn_entries = json.loads(meta.get('attention', '[]'))
    attention = [e['path'] for e in attn_entries]
    install_integer_attention(model, attention, [e['config'] for e in attn_entries])
    plan = json.loads(meta['plan'])
    for e in plan:
        lin = IntegerLinear(**e['config'])
        key = f'{e["path"]}{".linear" if e["kind"] == "patch" else ""}.weight_codes'
        if key + PACK_SUFFIX in state:
            state[key] = unpack_int4(state.pop(key + PACK_SUFFIX), state.pop(key + LOW_SUFFIX),
                                     e['config']['in_features'])
        mk = key.replace('.weight_codes', '.multiplier')
        if mk in state:
            state[mk] = state[mk].to(torch.int64)
        if e['kind'] == 'patch':
            lin = IntegerPatchEmbed(lin, e['patch_size'], e['out_channels'])
        _set_child(model, e['path'], lin)
        if e['drop_norm_quantizer']:
            model.get_submodule(e['norm']).out_quantizer = None
    coded = json.loads(meta.get('coded', '{}'))
    codes = {key: state.pop(key + CODES_SUFFIX) for key in coded}
    for key in codes:        # values set once the quantizers are loaded
        state[key] = torch.zeros(codes[key].shape)
    for key in [k for k in state if k.endswith(NARROW_SUFFIX)]:
        state.pop(key)
        base = key[:-len(NARROW_SUFFIX)]
        state[base] = state[base].to(torch.int64)
    missing, unexpected = model.load_state_dict(state, strict=False)
    derived = {f'{e["path"]}{".linear" if e["kind"] == "patch" else ""}.{name}'
               for e in plan for name in IntegerLinear.DERIVED}
    missing = [k for k in missing if k not in derived]
    with torch.no_grad():
        for key, qpath in coded.items():
            q = model.get_submodule(qpath)
            model.get_parameter(key).copy_(q.dequantize(codes[key].to(torch.int32)))
    # keys left out at saving are second paths to tensors that were saved once, or empty
    empty = {k for k, v in model.state_dict(keep_vars=True).items() if v.numel() == 0}
    missing = [k for k in missing if k not in empty]
    aliased = {k for k in model.state_dict(keep_vars=True) if k not in state}
    if unexpected or set(missing) - aliased:
        raise ValueError(f'{path}: tensors do not match the rebuilt integer model (missing '
                         f'{sorted(set(missing) - aliased)[:5]}, unexpected {sorted(unexpected)[:5]})')
    shared = {}
    for k, v in model.state_dict(keep_vars=True).items():
        shared.setdefault(id(v), []).append(k)
    orphans = [ks for ks in shared.values()
               if not any(k in state or k in derived or k in empty for k in ks)]
    if orphans:
        raise ValueError(f'{path}: tensors missing from the file: {orphans[:5]}')
    modes = json.loads(meta['modes'])
    from ..walk import named_quantizers, refresh
    for qname, q in named_quantizers(model):
        q.set_mode(modes.get(qname, 'quant'))
    refresh(model)
    for mod in model.modules():
        if isinstance(mod, IntegerLinear):
            mod.derive_constants()
    finish_integer(model)                # as to_integer
    model.fqvit_integer_plan = [[e['path'], e['kind'], e['norm']] for e in plan]
    model.fqvit_integer_attention = attention
    return model.to(device)
