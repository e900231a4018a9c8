# Shared ImageNet evaluation settings for timm classifiers on mmpretrain: mmpretrain's ImageNet
# dataset, pipeline, data preprocessor and Accuracy metric, and mmpretrain's TimmClassifier
# (``model`` in each config). Data root: $FQVIT_DATA (default ../shared/data). Weights: load_from
# (must exist; --checkpoint overrides it); tools/test.py wraps the model in QuantizedClassifier.
default_scope = 'mmpretrain'
custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)
# Fixed seed: layers without trained weights (random-weight runs) are identical in every process.
randomness = dict(seed=0)
data_root = '{{$FQVIT_DATA:../shared/data}}'
# timm's evaluation transform of DeiT / ViT (crop_pct 0.9): PIL decoding, short side resized to 248
# (bicubic), center crop 224, ImageNet mean / std (applied by the data preprocessor, in RGB).
data_preprocessor = dict(num_classes=1000, mean=[123.675, 116.28, 103.53],
                         std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='pillow'),
    dict(type='ResizeEdge', scale=248, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
test_dataloader = dict(
    batch_size=50, num_workers=2,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='ImageNet', data_root=f'{data_root}/imagenet/val1300', ann_file='labels.txt',
                 data_prefix='images', pipeline=test_pipeline))
test_evaluator = dict(type='Accuracy', topk=(1, 5))
test_cfg = dict(type='TestLoop')
# Calibration images: the train-like set, one image per class (protocol of ../shared/data/README).
# Batches of 100 as in FQ-ViT: its PTF quantizer picks the power-of-two factors on the last batch,
# so the batch size changes results slightly.
calib_dataloader = dict(
    batch_size=100, num_workers=2,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='ImageNet', data_root=f'{data_root}/imagenet/calib1000', ann_file='labels.txt',
                 data_prefix='images', pipeline=test_pipeline))
custom_hooks = [dict(type='CalibrationHook', dataloader=calib_dataloader)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=5))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
log_level = 'INFO'
