# DeiT-Tiny, PTQ4ViT twin uniform + Hessian-guided search, W8A8.
_base_ = ['./_base_imagenet.py']
quant_cfg = dict(method='ptq4vit', w_bits=8, a_bits=8, attn_bits=8, calib_images=32)
model = dict(type='TimmClassifier', model_name='deit_tiny_patch16_224')
load_from = '{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'
