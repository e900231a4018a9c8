# DeiT-Tiny, the best W4A4 mix (deit_tiny_mix_w4a4: AdaLog preset + RepQ-ViT's log√2 attention
# probabilities) with GPTQ (Hessian-compensated) weights on every weight role (per output channel,
# act-order). benchmarks/RESULTS.md row `mix_w4a4_gptq`.
_base_ = ['./_base_imagenet.py']
_gptq = dict(type='GPTQWeightQuantizer', bits=4, act_order=True)
quant_cfg = dict(method='adalog', w_bits=4, a_bits=4, attn_bits=4, calib_images=32,
                 roles=dict(attn_probs=dict(type='LogSqrt2Quantizer', bits=4),
                            weight=_gptq, patch_embed_weight=_gptq, head_weight=_gptq))
model = dict(type='TimmClassifier', model_name='deit_tiny_patch16_224',
             checkpoint='{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors',
             quant_cfg=quant_cfg)
