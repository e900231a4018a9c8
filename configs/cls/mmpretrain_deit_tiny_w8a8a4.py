# mmpretrain DeiT-Tiny, FQ-ViT MinMax + PTF + LIS: W8 / A8 / attention 4-bit (log2).
_base_ = './_mmpretrain_deit_tiny.py'
quant_cfg = dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4, observer='minmax', ptf=True, lis=True,
                 calib_images=1000)
