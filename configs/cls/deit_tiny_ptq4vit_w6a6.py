# DeiT-Tiny, PTQ4ViT twin uniform + Hessian-guided search, W6A6.
_base_ = ['./_base_imagenet.py']
quant_cfg = dict(method='ptq4vit', w_bits=6, a_bits=6, attn_bits=6, calib_images=32)
model = dict(type='TimmClassifier', model_name='deit_tiny_patch16_224')
load_from = '{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'
