# DeiT-Tiny, FQ-ViT MinMax + PTF + LIS: W8 / A8 / attention 4-bit (log2).
_base_ = ['./_base_imagenet.py']
quant_cfg = dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4, observer='minmax', ptf=True, lis=True,
                 calib_images=1000)
model = dict(type='TimmClassifier', model_name='deit_tiny_patch16_224')
load_from = '{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'
