"""Official Swin-Transformer-Object-Detection (mmdet 2.x) checkpoints → mmdet 3.x key layout.

Official backbone keys: ``layers.i.blocks.j.{norm1, attn.*, norm2, mlp.fc1, mlp.fc2}``,
``layers.i.downsample.{reduction, norm}``, ``patch_embed.proj``. mmdet 3.x: ``stages.i...``,
``attn.w_msa.*``, ``ffn.layers.0.0`` / ``ffn.layers.1``, ``patch_embed.projection``.

Patch merging: the official code concatenates the four 2×2 neighbours as [x(0,0), x(1,0), x(0,1),
x(1,1)] (row offset first), channel index ``k·C + c``; mmdet's ``nn.Unfold`` orders the kernel
positions row-major, [(0,0), (0,1), (1,0), (1,1)], channel index ``c·4 + p``. So unfold position p
holds official block k(p) = [0, 2, 1, 3][p], and the reduction weight's input columns and the
norm's channels are permuted accordingly. Pure tensor code: no mmdet import.
"""
from typing import Dict

import torch

UNFOLD_TO_CONCAT = (0, 2, 1, 3)


def _reorder_merge_channels(t: torch.Tensor) -> torch.Tensor:
    """Permute the last dim from concat order (k·C + c) to unfold order (c·4 + p)."""
    c4 = t.shape[-1]
    blocks = t.reshape(*t.shape[:-1], 4, c4 // 4)[..., list(UNFOLD_TO_CONCAT), :]
    return blocks.transpose(-1, -2).reshape(*t.shape[:-1], c4)


def _rename(key: str) -> str:
    key = key.replace('patch_embed.proj.', 'patch_embed.projection.')
    key = key.replace('.attn.', '.attn.w_msa.', 1) if '.attn.' in key else key
    key = key.replace('.mlp.fc1.', '.ffn.layers.0.0.').replace('.mlp.fc2.', '.ffn.layers.1.')
    return key


def convert_swin_od_state_dict(state: Dict[str, torch.Tensor], prefix: str = 'backbone.') -> Dict[str, torch.Tensor]:
    """Convert the backbone part (keys under ``prefix``) of an official Swin-OD detector state."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        sub = key[len(prefix):]
        if sub.startswith('layers.'):
            sub = 'stages.' + sub[len('layers.'):]
            if '.downsample.reduction.weight' in sub:
                value = _reorder_merge_channels(value)
            elif '.downsample.norm.' in sub:
                value = _reorder_merge_channels(value)
            elif sub.endswith('attn_mask'):
                continue  # computed at run time by mmdet
        sub = _rename(sub)
        out[prefix + sub] = value
    return out


def looks_like_swin_od(state: Dict[str, torch.Tensor], prefix: str = 'backbone.') -> bool:
    return any(k.startswith(prefix + 'layers.') for k in state)
