# PTQ4ViT (twin uniform + Hessian-guided search) on the tiny synthetic setup; a small search.
_base_ = ['./_tiny_cls_base.py']
quant_cfg = dict(method='ptq4vit', w_bits=6, a_bits=6, calib_images=10,
                 search_cfg=dict(images=10, rounds=1, grid_n=20, max_rows=256, attn_images=2,
                                 attn_rows=64))
