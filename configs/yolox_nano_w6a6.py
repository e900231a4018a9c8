# YOLOX-Nano (real COCO-trained weights), W6A6: the W8A8 config's model, data and checkpoint
# with 6-bit weights and activations (the stem conv's image input stays 8-bit).
_base_ = './yolox_nano_w8a8.py'
# Per-channel inputs for every conv, as at W8A8 (dense convs fold the scales into the weight):
# 26.6 AP; per-tensor dense-conv inputs: 25.5 (float 31.0); agreement AP 54.6 vs 63.7.
quant_cfg = dict(_delete_=True, method='repq', w_bits=6, a_bits=6, calib_images=32,
                 roles=dict(det_input=dict(type='UniformQuantizer', bits=6, ch_axis=1,
                                           include_zero=False, clamp_zero_point=False,
                                           observer=dict(type='PercentileSearchObserver')),
                            det_dw_input=dict(type='UniformQuantizer', bits=6, ch_axis=1,
                                              observer=dict(type='PercentileSearchObserver'))))
