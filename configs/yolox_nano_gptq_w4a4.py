# YOLOX-Nano (real COCO-trained weights), W4A4 with GPTQ (Hessian-compensated) weights: the
# yolox_nano_w4a4 recipe with every conv weight (det_weight, and the stem's patch_embed_weight)
# quantized by GPTQWeightQuantizer on the Hessian of each conv's quantized input.
_base_ = './yolox_nano_w4a4.py'
_gptq = dict(type='GPTQWeightQuantizer', bits=4, act_order=True)
quant_cfg = dict(roles=dict(det_weight=_gptq, patch_embed_weight=_gptq))
