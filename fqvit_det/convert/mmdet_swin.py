"""mmdet 3.x ``SwinTransformer`` backbone: the same tensor roles as timm Swin.

``WindowMSA`` computes QKᵀ and P·V inline, so its forward is replaced (class swap) by one that
routes q, k, v, the relative-position bias, the shifted-window mask and the softmax through the
attention quantizers. ``PatchMerging`` (nn.Unfold + LayerNorm + Linear) maps to LayerNorm/Linear
rules; the FFN's fc1/fc2 live at ``ffn.layers.0.0`` / ``ffn.layers.1``.
"""
from mmdet.models.backbones.swin import SwinBlock, SwinTransformer, WindowMSA

from .common import Rule
from .openmmlab_swin import (QuantSwinBlockMixin, QuantWindowMSAMixin, openmmlab_swin_norm_sources,
                             openmmlab_swin_rules)


class QuantWindowMSA(QuantWindowMSAMixin, WindowMSA):
    pass


class QuantSwinBlock(QuantSwinBlockMixin, SwinBlock):
    pass


def mmdet_swin_rules(prefix: str = 'backbone.'):
    p = prefix
    out_norm = openmmlab_swin_norm_sources(p)[3]
    return openmmlab_swin_rules(p, SwinBlock, QuantSwinBlock, QuantWindowMSA) + [
        # Output norms feed the neck, whose conv inputs are quantized by the detection rules.
        Rule(f'{p}norm?', 'layernorm', dict(input='ln_input'), input_from=out_norm),
    ]


def is_mmdet_swin(backbone) -> bool:
    return isinstance(backbone, SwinTransformer)
