# Mask R-CNN DeiT-Tiny (real backbone weights), FQ-ViT 8/8/4 with GPTQ (Hessian-compensated) weights
# for the transformer Linears and the patch embedding; everything else as mask_rcnn_deit_tiny_w8a8a4.
_base_ = './mask_rcnn_deit_tiny_w8a8a4.py'
_gptq = dict(type='GPTQWeightQuantizer', bits=8, act_order=True)
quant_cfg = dict(roles=dict(weight=_gptq, patch_embed_weight=_gptq))
