# Mask R-CNN DeiT-Tiny (real backbone weights), FQ-ViT MinMax + PTF + LIS, W8/A8/attention 4-bit; scope='full'.
_base_ = './_base_/mask_rcnn_deit_tiny.py'
quant_cfg = dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4, observer='minmax', ptf=True, lis=True)
