"""mmpretrain ``ImageClassifier`` with a ``SwinTransformer`` backbone: the same tensor roles as
timm's Swin (``timm_swin.py``), on mmpretrain's module names (close to mmdet's Swin,
``mmdet_swin.py``).

``ShiftWindowMSA`` pads, shifts and partitions windows and calls its ``WindowMSA`` (``w_msa``),
which computes QKᵀ and P·V inline: ``WindowMSA``'s forward is replaced (class swap) by one that
routes q, k, v, the relative-position bias, the shifted-window mask and the softmax through the
attention quantizers. ``PatchMerging`` (nn.Unfold + LayerNorm + Linear) maps to LayerNorm/Linear
rules; the FFN's fc1/fc2 live at ``ffn.layers.0.0`` / ``ffn.layers.1``. The classifier pools the
output norm (``backbone.norm3``) globally and feeds ``head.fc``.
"""
from mmpretrain.models.backbones.swin_transformer import SwinBlock, SwinTransformer
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.models.utils.attention import WindowMSA

from .common import Rule
from .openmmlab_swin import (QuantSwinBlockMixin, QuantWindowMSAMixin, openmmlab_swin_norm_sources,
                             openmmlab_swin_rules)


class QuantMMPretrainWindowMSA(QuantWindowMSAMixin, WindowMSA):
    pass


class QuantMMPretrainSwinBlock(QuantSwinBlockMixin, SwinBlock):
    pass


def mmpretrain_swin_rules(prefix: str = 'backbone.'):
    p = prefix
    out_norm = openmmlab_swin_norm_sources(p)[3]
    return openmmlab_swin_rules(p, SwinBlock, QuantMMPretrainSwinBlock, QuantMMPretrainWindowMSA) + [
        # The classifier's output norm (timm's ``norm``), before global average pooling.
        Rule(f'{p}norm?', 'layernorm', dict(input='ln_input', output='final_ln_output'), input_from=out_norm),
        Rule('head.fc', 'linear', dict(weight='head_weight', input='head_input', output='head_output'),
             optional=True),
    ]


def is_mmpretrain_swin(model) -> bool:
    return isinstance(model, ImageClassifier) and isinstance(model.backbone, SwinTransformer)
