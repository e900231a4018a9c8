# COCO data settings for ../shared/data/coco_mini ($FQVIT_DATA overrides the data folder):
# calibrate on train2017, evaluate on val2017 (79 images), the standard COCO layout.
custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)
# Fixed seed: layers without trained weights (random-weight runs) are identical in every process.
randomness = dict(seed=0)
coco_root = '{{$FQVIT_DATA:../shared/data}}/coco_mini/'
coco_test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
coco_test_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CocoDataset', data_root=coco_root,
                 ann_file='annotations/instances_val2017.json',
                 data_prefix=dict(img='val2017/'), test_mode=True, pipeline=coco_test_pipeline))
coco_evaluator = dict(type='CocoMetric', ann_file=coco_root + 'annotations/instances_val2017.json',
                      metric=['bbox', 'segm'], format_only=False, backend_args=None)
# Calibration: train2017 images through the test pipeline (no augmentation), in file order.
coco_calib_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CocoDataset', data_root=coco_root,
                 ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'), test_mode=True, pipeline=coco_test_pipeline))
