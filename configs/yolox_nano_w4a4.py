# YOLOX-Nano (real COCO-trained weights), W4A4: the W8A8 config's model, data and checkpoint
# with 4-bit weights and activations (the stem conv's image input stays 8-bit).
_base_ = './yolox_nano_w8a8.py'
quant_cfg = dict(_delete_=True, method='repq', w_bits=4, a_bits=4, calib_images=32,
                 roles=dict(det_dw_input=dict(type='UniformQuantizer', bits=4, ch_axis=1,
                                              observer=dict(type='PercentileSearchObserver'))))
