# FQ-ViT with PTF and LIS on the tiny synthetic setup.
_base_ = ['./_tiny_cls_base.py']
quant_cfg = dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4, observer='minmax', ptf=True,
                 lis=True, calib_images=10)
