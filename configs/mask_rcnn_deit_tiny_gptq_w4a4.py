# Mask R-CNN DeiT-Tiny (real backbone weights), RepQ-ViT W4A4 with GPTQ (Hessian-compensated) weights
# for the transformer Linears and the patch embedding; everything else as mask_rcnn_deit_tiny_w4a4.
_base_ = './mask_rcnn_deit_tiny_w4a4.py'
_gptq = dict(type='GPTQWeightQuantizer', bits=4, act_order=True)
quant_cfg = dict(roles=dict(weight=_gptq, patch_embed_weight=_gptq))
