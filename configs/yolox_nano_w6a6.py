# YOLOX-Nano (real COCO-trained weights), W6A6: the W8A8 config's model, data and checkpoint
# with 6-bit weights and activations (the stem conv's image input stays 8-bit).
_base_ = './yolox_nano_w8a8.py'
quant_cfg = dict(_delete_=True, method='repq', w_bits=6, a_bits=6, calib_images=32,
                 roles=dict(det_dw_input=dict(type='UniformQuantizer', bits=6, ch_axis=1,
                                              observer=dict(type='PercentileSearchObserver'))))
