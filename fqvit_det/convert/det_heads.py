"""Necks and heads of mmdet detectors (FPN, RPN, RoI bbox/mask heads): every Conv2d and Linear
gets the ``det_weight`` / ``det_input`` roles (RepQ-ViT's whole-detector protocol; transposed
convolutions such as the mask head's upsampler stay float, as in RepQ-ViT)."""
from .common import Rule

DET_PARTS = ('neck', 'rpn_head', 'roi_head')


def det_head_rules(parts=DET_PARTS):
    roles = dict(weight='det_weight', input='det_input')
    rules = []
    for part in parts:
        # Heads differ in what they hold (an RPN head has no Linear): each rule may match nothing.
        rules += [Rule(f'{part}.*', 'conv', roles, optional=True),
                  Rule(f'{part}.*', 'linear', roles, optional=True)]
    return rules
