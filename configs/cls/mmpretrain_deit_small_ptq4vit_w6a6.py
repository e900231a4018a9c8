# mmpretrain DeiT-Small, PTQ4ViT twin uniform + Hessian-guided search, W6A6.
_base_ = './_mmpretrain_deit_small.py'
quant_cfg = dict(method='ptq4vit', w_bits=6, a_bits=6, attn_bits=6, calib_images=32)
