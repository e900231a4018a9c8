# Mask R-CNN Swin-T, RepQ-ViT, W4A4; backbone + neck + RPN + RoI heads (scope='full').
_base_ = './_base_/mask_rcnn_swin_t.py'
quant_cfg = dict(method='repq', w_bits=4, a_bits=4)
