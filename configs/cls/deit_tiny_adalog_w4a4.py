# DeiT-Tiny, AdaLog + FPCS, W4A4.
_base_ = ['./_base_imagenet.py']
quant_cfg = dict(method='adalog', w_bits=4, a_bits=4, attn_bits=4, calib_images=32)
model = dict(type='TimmClassifier', model_name='deit_tiny_patch16_224')
load_from = '{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'
