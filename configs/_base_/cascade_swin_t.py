# Cascade Mask R-CNN, Swin-T, official Swin-Transformer-Object-Detection settings (mmdet 3.3 ships no
# Cascade Swin config): 4conv1fc bbox heads with BN (SyncBN in the official training config; identical
# at inference), GIoU-decoded regression, 3x multi-scale schedule. Expected checkpoint:
# cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.pth
# (box 50.4 / mask 43.7), converted with tools/convert_checkpoint.py.
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', './coco_mini.py']
swin_depths = [2, 2, 6, 2]
_bbox_head = dict(
    type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256,
    conv_out_channels=256, fc_out_channels=1024, roi_feat_size=7, num_classes=80,
    reg_class_agnostic=False, reg_decoded_bbox=True, norm_cfg=dict(type='BN', requires_grad=True),
    loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
    loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
model = dict(
    backbone=dict(
        _delete_=True, type='SwinTransformer', embed_dims=96, depths=swin_depths,
        num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None,
        drop_rate=0., attn_drop_rate=0., drop_path_rate=0.2, patch_norm=True,
        out_indices=(0, 1, 2, 3), with_cp=False, convert_weights=False, init_cfg=None),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(bbox_head=[
        dict(**_bbox_head, bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                           target_stds=[0.1, 0.1, 0.2, 0.2])),
        dict(**_bbox_head, bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                           target_stds=[0.05, 0.05, 0.1, 0.1])),
        dict(**_bbox_head, bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                           target_stds=[0.033, 0.033, 0.067, 0.067])),
    ]))
test_dataloader = {{_base_.coco_test_dataloader}}
val_dataloader = {{_base_.coco_test_dataloader}}
test_evaluator = {{_base_.coco_evaluator}}
val_evaluator = {{_base_.coco_evaluator}}
calib_dataloader = {{_base_.coco_calib_dataloader}}
