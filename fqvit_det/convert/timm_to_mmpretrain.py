"""timm ViT / DeiT state dicts ↔ mmpretrain ``ImageClassifier`` (``VisionTransformer`` backbone,
``VisionTransformerClsHead``) key names. Pure key renaming: every tensor keeps its values and shape.

    timm                          mmpretrain
    cls_token, pos_embed          backbone.cls_token, backbone.pos_embed
    patch_embed.proj.*            backbone.patch_embed.projection.*
    blocks.i.norm1.*              backbone.layers.i.ln1.*
    blocks.i.attn.{qkv,proj}.*    backbone.layers.i.attn.{qkv,proj}.*
    blocks.i.norm2.*              backbone.layers.i.ln2.*
    blocks.i.mlp.fc1.*            backbone.layers.i.ffn.layers.0.0.*
    blocks.i.mlp.fc2.*            backbone.layers.i.ffn.layers.1.*
    blocks.i.ls1.gamma            backbone.layers.i.attn.gamma1.weight   (layer scale)
    blocks.i.ls2.gamma            backbone.layers.i.ffn.gamma2.weight
    norm.*                        backbone.ln1.*
    head.*                        head.layers.head.*

Both layouts store the qkv Linear as one (3·C, C) matrix in q, k, v order, so no tensor is
reordered. Distilled DeiT (``dist_token``, ``head_dist``) and other timm ViT variants are refused
with the offending key named.
"""
import re
from typing import Dict, List, Tuple

import torch

_FIXED = [('cls_token', 'backbone.cls_token'), ('pos_embed', 'backbone.pos_embed'),
          ('patch_embed.proj.', 'backbone.patch_embed.projection.'), ('norm.', 'backbone.ln1.'),
          ('head.', 'head.layers.head.')]
_BLOCK = [('norm1.', 'ln1.'), ('attn.qkv.', 'attn.qkv.'), ('attn.proj.', 'attn.proj.'),
          ('norm2.', 'ln2.'), ('mlp.fc1.', 'ffn.layers.0.0.'), ('mlp.fc2.', 'ffn.layers.1.'),
          ('ls1.gamma', 'attn.gamma1.weight'), ('ls2.gamma', 'ffn.gamma2.weight')]
_TIMM_BLOCK = re.compile(r'blocks\.(\d+)\.(.+)$')
_MM_BLOCK = re.compile(r'backbone\.layers\.(\d+)\.(.+)$')


def _rename(key: str, fixed: List[Tuple[str, str]], block_re, block_prefix: str,
            block_map: List[Tuple[str, str]], what: str) -> str:
    m = block_re.match(key)
    if m:
        index, rest = m.groups()
        for src, dst in block_map:
            if rest == src or (src.endswith('.') and rest.startswith(src)):
                return f'{block_prefix}{index}.{dst}{rest[len(src):]}'
    else:
        for src, dst in fixed:
            if key == src or (src.endswith('.') and key.startswith(src)):
                return dst + key[len(src):]
    raise ValueError(f'{what}: no mapping for key {key!r} (supported: plain ViT / DeiT with a '
                     'class token and one linear head; distilled DeiT and other variants are not)')


def _convert(state: Dict[str, torch.Tensor], forward: bool) -> Dict[str, torch.Tensor]:
    if forward:
        args = (_FIXED, _TIMM_BLOCK, 'backbone.layers.', _BLOCK, 'timm → mmpretrain')
    else:
        args = ([(d, s) for s, d in _FIXED], _MM_BLOCK, 'blocks.', [(d, s) for s, d in _BLOCK],
                'mmpretrain → timm')
    out = {}
    for key, value in state.items():
        new = _rename(key, *args)
        if new in out:
            raise ValueError(f'{args[-1]}: keys collide on {new!r}')
        out[new] = value
    return out


def timm_vit_to_mmpretrain(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A timm ViT/DeiT state dict with mmpretrain ``ImageClassifier`` key names."""
    return _convert(state, forward=True)


def mmpretrain_vit_to_timm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of ``timm_vit_to_mmpretrain``."""
    return _convert(state, forward=False)


def looks_like_timm_vit(state: Dict[str, torch.Tensor]) -> bool:
    """A timm ViT state dict (block keys ``blocks.i.*``, patch embedding ``patch_embed.proj``)."""
    return 'patch_embed.proj.weight' in state and any(k.startswith('blocks.') for k in state)
