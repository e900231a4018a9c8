# Mask R-CNN Swin-S, RepQ-ViT, W8A8; backbone + neck + RPN + RoI heads (scope='full').
_base_ = './_base_/mask_rcnn_swin_s.py'
quant_cfg = dict(method='repq', w_bits=8, a_bits=8)
