# Cascade Mask R-CNN, Swin-S (depths 2-2-18-2), otherwise as cascade_swin_t.py. Expected checkpoint:
# cascade_mask_rcnn_swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.pth
# (box 51.9 / mask 45.0), converted with tools/convert_checkpoint.py.
_base_ = ['./cascade_swin_t.py']
model = dict(backbone=dict(depths=[2, 2, 18, 2]))
