# YOLOX-Nano (real COCO-trained weights), quantized W8A8: mmdet's own config, unchanged, plus what
# a user adds to quantize it: the plugin import, quant_cfg, the checkpoint and the coco_mini data.
# BatchNorm is folded into the convolutions before conversion (quant_cfg.fold_bn, default True);
# every convolution of backbone, neck and head is quantized (depthwise ones too).
_base_ = 'mmdet::yolox/yolox_nano_8xb8-300e_coco.py'
custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)

# RepQ-ViT's uniform quantizers (no LayerNorm here, so no reparameterization): per-channel
# weights, activations with percentile-search ranges. Every conv reads its input per channel
# (det_input / det_dw_input with ch_axis=1), integer-exact: a depthwise conv's output channel
# reads one input channel, and a dense conv folds the input scales into its weight before the
# weight is quantized, Q(W·diag(s)) (as RepQ-ViT folds LayerNorm-output scales into the next
# Linear). Per-tensor dense-conv inputs instead: 30.3 AP; these: 31.3 (float 31.0), though the
# agreement AP with the float predictions drops 93.3 -> 92.2 (benchmarks/RESULTS.md). The image
# entering the stem conv is 8-bit (repq's patch_embed_input; exact for 0..255 pixels).
quant_cfg = dict(method='repq', w_bits=8, a_bits=8, calib_images=32,
                 roles=dict(det_input=dict(type='UniformQuantizer', bits=8, ch_axis=1,
                                           include_zero=False, clamp_zero_point=False,
                                           observer=dict(type='PercentileSearchObserver')),
                            det_dw_input=dict(type='UniformQuantizer', bits=8, ch_axis=1,
                                              observer=dict(type='PercentileSearchObserver'))))

# The official YOLOX-Nano weights as an mmdet state dict (safetensors; the quantized-model wrapper
# loads it weights-only and strictly -- mmengine's own loader cannot read safetensors).
load_from = '{{$FQVIT_DATA:../shared/data}}/yolox_nano/yolox_nano_coco.safetensors'
# The base config's EMAHook would swap in its own (untrained) weight copy at test time.
custom_hooks = []

data_root = '{{$FQVIT_DATA:../shared/data}}/coco_mini/'
test_dataloader = dict(
    batch_size=1, num_workers=1, persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file='annotations/instances_val2017.json',
                 data_prefix=dict(img='val2017/')))
val_dataloader = test_dataloader
test_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
val_evaluator = test_evaluator
# Calibration: coco_mini train2017 images through the test pipeline (no augmentation).
calib_dataloader = dict(
    batch_size=1, num_workers=1, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CocoDataset', data_root=data_root,
                 ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'), test_mode=True,
                 pipeline={{_base_.test_pipeline}}))
