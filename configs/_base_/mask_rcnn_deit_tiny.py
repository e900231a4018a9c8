# Mask R-CNN with a timm DeiT-Tiny backbone (ViTDet-style simple feature pyramid) on coco_mini.
# The backbone loads the real ImageNet DeiT-Tiny weights from $FQVIT_DATA; the pyramid, neck and
# heads have no trained weights anywhere (no such detector is published), so its mAP is not a
# quality measure: it is used for backbone-feature fidelity (SQNR) and for end-to-end runs.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './coco_mini.py']
model = dict(
    backbone=dict(_delete_=True, type='TimmViTBackbone', model_name='deit_tiny_patch16_224',
                  checkpoint='{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'),
    neck=dict(in_channels=[48, 96, 192, 192]))
test_dataloader = {{_base_.coco_test_dataloader}}
val_dataloader = {{_base_.coco_test_dataloader}}
test_evaluator = {{_base_.coco_evaluator}}
val_evaluator = {{_base_.coco_evaluator}}
calib_dataloader = {{_base_.coco_calib_dataloader}}
