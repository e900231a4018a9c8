# Cascade Mask R-CNN Swin-T, FQ-ViT MinMax + PTF + LIS, W8/A8/attention 4-bit; backbone + neck + RPN + RoI heads (scope='full').
_base_ = './_base_/cascade_swin_t.py'
quant_cfg = dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4, observer='minmax', ptf=True, lis=True)
