# DeiT-Tiny, best measured W4A4 mix (no code, roles only): the AdaLog preset (FPCS search,
# AdaLog post-GELU, per-head q/k/v, RepQ reparameterization) with RepQ-ViT's log√2 quantizer on
# the attention probabilities. benchmarks/RESULTS.md row `mix_w4a4`.
_base_ = ['./_base_imagenet.py']
quant_cfg = dict(method='adalog', w_bits=4, a_bits=4, attn_bits=4, calib_images=32,
                 roles=dict(attn_probs=dict(type='LogSqrt2Quantizer', bits=4)))
model = dict(type='TimmClassifier', model_name='deit_tiny_patch16_224')
load_from = '{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'
