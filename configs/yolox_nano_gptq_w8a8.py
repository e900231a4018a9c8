# YOLOX-Nano (real COCO-trained weights), W8A8 with GPTQ (Hessian-compensated) weights: every conv
# weight (det_weight, and the stem's patch_embed_weight) quantized by GPTQWeightQuantizer on the
# Hessian of each conv's quantized input. Activations as RepQ-ViT's preset (per-tensor, percentile
# search) with per-channel depthwise inputs -- the recipe these rows were measured with. (GPTQ and
# the per-channel dense-conv input fold of yolox_nano_w8a8.py are not combined yet.)
_base_ = './yolox_nano_w8a8.py'
_gptq = dict(type='GPTQWeightQuantizer', bits=8, act_order=True)
quant_cfg = dict(_delete_=True, method='repq', w_bits=8, a_bits=8, calib_images=32,
                 roles=dict(det_dw_input=dict(type='UniformQuantizer', bits=8, ch_axis=1,
                                              observer=dict(type='PercentileSearchObserver')),
                            det_weight=_gptq, patch_embed_weight=_gptq))
