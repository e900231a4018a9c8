# DeiT-Tiny classification: dynamic activations and GPTQ (Hessian-compensated) weights,
# W8A8 (issue 11 §2; benchmarks/RESULTS.md, "Dynamic activations"). Backbone roles: activations
# read by a Linear (LayerNorm outputs, P·V output, post-GELU, head input) quantized at run time per
# token in groups of 32 channels; q and k per token, v per channel over the tokens (Q·Kᵀ and P·V stay
# integer); attention probabilities on a log√2 grid scaled per attention row; the image on the grid
# of its uint8 pixels (exact; the normalization folds into the patch embedding). Pixel mean/std:
# timm's ImageNet normalization in pixel units (255 × 0.485, …; equal to mmdet's). 32 calibration images.
_base_ = ['./_base_imagenet.py']
_grp = dict(type='DynamicQuantizer', bits=8, granularity='group', group_size=32)
_tok = dict(type='DynamicQuantizer', bits=8)
_w = dict(type='GPTQWeightQuantizer', bits=8, act_order=True)
quant_cfg = dict(
    method='repq', w_bits=8, a_bits=8, attn_bits=8, reparam=False, calib_images=32,
    roles=dict(
        patch_embed_input=dict(type='PixelInputQuantizer', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]),
        ln_output=_grp, proj_input=_grp, fc2_input=_grp, head_input=_grp,
        q=_tok, k=_tok, v=dict(_tok, dim=-2),
        attn_probs=dict(type='DynamicSoftmaxQuantizer', bits=8, grid='log_sqrt2'),
        weight=_w, patch_embed_weight=_w))
model = dict(type='TimmClassifier', model_name='deit_tiny_patch16_224')
load_from = '{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'
