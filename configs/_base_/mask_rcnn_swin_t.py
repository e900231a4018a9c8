# Mask R-CNN, Swin-T backbone, 3x multi-scale schedule (official Swin detection setting),
# evaluated on coco_mini. Expected checkpoint: Swin-Transformer-Object-Detection
# mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.pth (box 46.0 / mask 41.6),
# converted with tools/convert_checkpoint.py.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py', './coco_mini.py']
test_dataloader = {{_base_.coco_test_dataloader}}
val_dataloader = {{_base_.coco_test_dataloader}}
test_evaluator = {{_base_.coco_evaluator}}
val_evaluator = {{_base_.coco_evaluator}}
calib_dataloader = {{_base_.coco_calib_dataloader}}
model = dict(backbone=dict(init_cfg=None))
