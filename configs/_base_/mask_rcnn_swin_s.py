# Mask R-CNN, Swin-S backbone, 3x multi-scale schedule, evaluated on coco_mini. Expected checkpoint:
# Swin-Transformer-Object-Detection mask_rcnn_swin_small_patch4_window7_mstrain_480-800_adamw_3x_coco.pth
# (box 48.5 / mask 43.3; mmdet's own Swin-S 3x checkpoint is 48.2 / 43.2), converted with
# tools/convert_checkpoint.py (mmdet's checkpoint loads as is).
_base_ = ['mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py', './coco_mini.py']
test_dataloader = {{_base_.coco_test_dataloader}}
val_dataloader = {{_base_.coco_test_dataloader}}
test_evaluator = {{_base_.coco_evaluator}}
val_evaluator = {{_base_.coco_evaluator}}
calib_dataloader = {{_base_.coco_calib_dataloader}}
model = dict(backbone=dict(init_cfg=None))
