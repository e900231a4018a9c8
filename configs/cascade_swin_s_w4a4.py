# Cascade Mask R-CNN Swin-S, RepQ-ViT, W4A4; backbone + neck + RPN + RoI heads (scope='full').
_base_ = './_base_/cascade_swin_s.py'
quant_cfg = dict(method='repq', w_bits=4, a_bits=4)
