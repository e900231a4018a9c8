# mmpretrain DeiT-Base, AdaLog + FPCS, W4A4.
_base_ = './_mmpretrain_deit_base.py'
quant_cfg = dict(method='adalog', w_bits=4, a_bits=4, attn_bits=4, calib_images=32)
