# Mask R-CNN DeiT-Tiny (real backbone weights), RepQ-ViT, W6A6; scope='full'.
_base_ = './_base_/mask_rcnn_deit_tiny.py'
quant_cfg = dict(method='repq', w_bits=6, a_bits=6)
