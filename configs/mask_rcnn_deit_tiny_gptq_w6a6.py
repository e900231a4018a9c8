# Mask R-CNN DeiT-Tiny (real backbone weights), RepQ-ViT W6A6 with GPTQ (Hessian-compensated) weights
# for the transformer Linears and the patch embedding; everything else as mask_rcnn_deit_tiny_w6a6.
_base_ = './mask_rcnn_deit_tiny_w6a6.py'
_gptq = dict(type='GPTQWeightQuantizer', bits=6, act_order=True)
quant_cfg = dict(roles=dict(weight=_gptq, patch_embed_weight=_gptq))
