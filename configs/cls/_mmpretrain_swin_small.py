# mmpretrain Swin-S: its own config (model, test pipeline, data preprocessor, Accuracy)
# on the ImageNet subsets of ../shared/data ($FQVIT_DATA): val1300 to evaluate, calib1000 to
# calibrate. tools/test.py wraps the model in QuantizedClassifier and loads load_from.
_base_ = 'mmpretrain::swin_transformer/swin-small_16xb64_in1k.py'
# mmpretrain model-zoo weights (download them into checkpoints/; no weights ship with this repo).
load_from = 'checkpoints/swin_small_224_b16x64_300e_imagenet_20210615_110219-7f9d988b.pth'
custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)
randomness = dict(seed=0)
imagenet_root = '{{$FQVIT_DATA:../shared/data}}/imagenet'
test_dataloader = dict(
    batch_size=50, num_workers=2,
    dataset=dict(data_root=f'{imagenet_root}/val1300', split='', ann_file='labels.txt',
                 data_prefix='images'))
# Calibration: imagenet/calib1000 (train-like) through the same test pipeline, batches of 100.
calib_dataloader = dict(
    batch_size=100, num_workers=2,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='ImageNet', data_root=f'{imagenet_root}/calib1000', ann_file='labels.txt',
                 data_prefix='images', pipeline={{_base_.test_pipeline}}))
default_hooks = dict(logger=dict(interval=5))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
