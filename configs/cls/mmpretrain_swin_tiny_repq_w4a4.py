# mmpretrain Swin-T, RepQ-ViT reparameterization + log-sqrt2, W4A4.
_base_ = './_mmpretrain_swin_tiny.py'
quant_cfg = dict(method='repq', w_bits=4, a_bits=4, attn_bits=4, calib_images=32)
