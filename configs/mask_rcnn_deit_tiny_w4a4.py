# Mask R-CNN DeiT-Tiny (real backbone weights), RepQ-ViT, W4A4; scope='full'.
_base_ = './_base_/mask_rcnn_deit_tiny.py'
quant_cfg = dict(method='repq', w_bits=4, a_bits=4)
