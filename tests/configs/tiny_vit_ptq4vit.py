# PTQ4ViT (twin uniform + Hessian-guided search) on the tiny synthetic setup.
_base_ = ['./_tiny_cls_base.py']
quant_cfg = dict(method='ptq4vit', w_bits=6, a_bits=6, calib_images=10)
model = dict(quant_cfg=quant_cfg)
