# mmpretrain DeiT-Tiny: its own config (model, test pipeline, data preprocessor, Accuracy)
# on the ImageNet subsets of ../shared/data ($FQVIT_DATA): val1300 to evaluate, calib1000 to
# calibrate. tools/test.py wraps the model in QuantizedClassifier and loads load_from.
_base_ = 'mmpretrain::deit/deit-tiny_4xb256_in1k.py'
# The real DeiT-Tiny of ../shared/data (timm key names, renamed to mmpretrain's on the fly by
# QuantizedClassifier). mmpretrain's own file is deit-tiny_pt-4xb256_in1k_20220218-13b382a0.pth
# (set load_from to it, or convert once: tools/convert_timm_to_mmpretrain.py).
load_from = '{{$FQVIT_DATA:../shared/data}}/deit_tiny/deit_tiny_patch16_224.safetensors'
# timm's DeiT evaluation transform (crop_pct 0.9: short side 248, bicubic, PIL decoding) instead of
# mmpretrain's (short side 256), so the numbers compare with the timm configs on the same pixels.
test_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='pillow'),
    dict(type='ResizeEdge', scale=248, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)
randomness = dict(seed=0)
imagenet_root = '{{$FQVIT_DATA:../shared/data}}/imagenet'
test_dataloader = dict(
    batch_size=50, num_workers=2,
    dataset=dict(data_root=f'{imagenet_root}/val1300', split='', ann_file='labels.txt',
                 data_prefix='images',
                 pipeline=test_pipeline))
# Calibration: imagenet/calib1000 (train-like) through the same test pipeline, batches of 100.
calib_dataloader = dict(
    batch_size=100, num_workers=2,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='ImageNet', data_root=f'{imagenet_root}/calib1000', ann_file='labels.txt',
                 data_prefix='images', pipeline=test_pipeline))
default_hooks = dict(logger=dict(interval=5))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
