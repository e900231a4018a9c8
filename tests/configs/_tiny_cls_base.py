# A tiny synthetic classification setup for CLI tests (no shared data): timm's 'test_vit'
# (160x160 input) cut to 2 blocks, 4 classes, images and weights written by the test into
# $FQVIT_TINY (class folders under images/, weights in weights.safetensors). mmpretrain's
# CustomDataset, pipeline, Accuracy and TimmClassifier, as the configs under configs/cls/.
default_scope = 'mmpretrain'
custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)
randomness = dict(seed=0)
tiny_root = '{{$FQVIT_TINY:/nonexistent-fqvit-tiny}}'
data_preprocessor = dict(num_classes=4, mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5],
                         to_rgb=True)
pipeline = [dict(type='LoadImageFromFile'),
            dict(type='ResizeEdge', scale=160, edge='short', backend='pillow', interpolation='bicubic'),
            dict(type='CenterCrop', crop_size=160),
            dict(type='PackInputs')]
_loader = dict(
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root=tiny_root, data_prefix='images', pipeline=pipeline))
test_dataloader = dict(batch_size=3, **_loader)
# 10 calibration images in batches of 4: global batches of 4, 4, 2 (with 2 processes rank 0
# takes batches 0 and 2, rank 1 batch 1).
calib_dataloader = dict(batch_size=4, **_loader)
test_evaluator = dict(type='Accuracy', topk=(1, 2))
test_cfg = dict(type='TestLoop')
custom_hooks = [dict(type='CalibrationHook', dataloader=calib_dataloader)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=1))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl'))
log_level = 'INFO'
model = dict(type='TimmClassifier', model_name='test_vit', depth=2, num_classes=4)
load_from = f'{tiny_root}/weights.safetensors'
