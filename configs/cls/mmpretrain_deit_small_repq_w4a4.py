# mmpretrain DeiT-Small, RepQ-ViT reparameterization + log-sqrt2, W4A4.
_base_ = './_mmpretrain_deit_small.py'
quant_cfg = dict(method='repq', w_bits=4, a_bits=4, attn_bits=4, calib_images=32)
