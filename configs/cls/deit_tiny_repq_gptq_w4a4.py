# DeiT-Tiny, RepQ-ViT W4A4 with GPTQ (Hessian-compensated) weights: the deit_tiny_repq_w4a4 recipe
# with every weight role quantized by GPTQWeightQuantizer (per output channel, act-order, Hessian of
# each layer's quantized input on the calibrated model). benchmarks/RESULTS.md row `repq_w4a4_gptq`.
_base_ = ['./_base_imagenet.py']
_gptq = dict(type='GPTQWeightQuantizer', bits=4, act_order=True)
quant_cfg = dict(method='repq', w_bits=4, a_bits=4, attn_bits=4, calib_images=32,
                 roles=dict(weight=_gptq, patch_embed_weight=_gptq, head_weight=_gptq))
model = dict(type='TimmClassifier', model_name='deit_tiny_patch16_224')
load_from = '{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'
