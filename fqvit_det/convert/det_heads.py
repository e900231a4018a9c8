"""Detector parts outside a transformer backbone: necks, heads, and CNN backbones.

Every Conv2d and Linear of a neck or head (FPN, RPN, RoI bbox/mask heads, YOLOX PAFPN and head,
...) gets the ``det_weight`` / ``det_input`` roles (RepQ-ViT's whole-detector protocol; transposed
convolutions such as the mask head's upsampler stay float, as in RepQ-ViT). A CNN backbone is
quantized the same way, except that the convolution reading the image takes the
``patch_embed_weight`` / ``patch_embed_input`` roles: it is the CNN's patch embedding, and its
input is the raw pixel grid (exact at 8 bits), which configs may keep at 8 bits when the other
activations go lower. Depthwise convolutions take ``det_dw_input`` for their input (by default the
same quantizer as ``det_input``), where per-channel activation scales are integer-exact.
"""
from typing import List

from torch import nn

from .common import Rule

DET_PARTS = ('neck', 'rpn_head', 'roi_head')
DET_ROLES = dict(weight='det_weight', input='det_input')
STEM_ROLES = dict(weight='patch_embed_weight', input='patch_embed_input')
# Children of an mmdet detector that are not network parts.
NON_PARTS = ('backbone', 'data_preprocessor')


DW_ROLES = dict(weight='det_weight', input='det_dw_input')


def depthwise_rules(model: nn.Module, prefix: str) -> List[Rule]:
    """Exact-path rules giving depthwise convolutions (groups == in_channels > 1) the
    ``det_dw_input`` role: each output channel reads one input channel, so a per-channel input
    scale factors out of the integer sum like a per-channel weight scale does."""
    return [Rule(f'{prefix}{path}', 'conv', DW_ROLES) for path, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]


def det_head_rules(parts=DET_PARTS, detector: nn.Module = None):
    """Rules for the detector's parts; with ``detector``, its depthwise convs get ``det_dw_input``."""
    rules = []
    for part in parts:
        if detector is not None:
            rules += depthwise_rules(getattr(detector, part), f'{part}.')
        # Heads differ in what they hold (an RPN head has no Linear): each rule may match nothing.
        rules += [Rule(f'{part}.*', 'conv', DET_ROLES, optional=True),
                  Rule(f'{part}.*', 'linear', DET_ROLES, optional=True)]
    return rules


def detector_parts(detector: nn.Module) -> List[str]:
    """Names of the detector's network parts after the backbone (neck, rpn_head, roi_head,
    bbox_head, ...): every child module except the backbone and the data preprocessor."""
    return [name for name, _ in detector.named_children() if name not in NON_PARTS]


def is_transformer_backbone(backbone: nn.Module) -> bool:
    """Whether the backbone contains attention (then it needs transformer rules, not CNN rules)."""
    return any(isinstance(m, nn.MultiheadAttention) or 'attention' in type(m).__name__.lower()
               for m in backbone.modules())


def cnn_backbone_rules(backbone: nn.Module, prefix: str = 'backbone.') -> List[Rule]:
    """Rules for a CNN backbone: the first Conv2d (the one reading the image) takes the
    patch-embedding roles, every other Conv2d and Linear the detection roles."""
    stem = next((path for path, m in backbone.named_modules() if isinstance(m, nn.Conv2d)), None)
    if stem is None:
        raise TypeError(f'backbone {type(backbone).__name__} has no Conv2d: no CNN rules apply')
    return [Rule(f'{prefix}{stem}', 'conv', STEM_ROLES), *depthwise_rules(backbone, prefix),
            Rule(f'{prefix}*', 'conv', DET_ROLES), Rule(f'{prefix}*', 'linear', DET_ROLES, optional=True)]
