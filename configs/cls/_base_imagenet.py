# Shared ImageNet evaluation settings. Data root: $FQVIT_DATA (default ../shared/data).
# Model weights: `model.checkpoint` (must exist; --checkpoint overrides it). For timm's hub weights
# instead, set checkpoint=None, pretrained=True.
custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)
# Fixed seed: layers without trained weights (random-weight runs) are identical in every process.
randomness = dict(seed=0)
data_root = '{{$FQVIT_DATA:../shared/data}}'
model_name = 'deit_tiny_patch16_224'

test_dataloader = dict(
    batch_size=50, num_workers=2,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageNetDataset', data_root=f'{data_root}/imagenet/val1300',
                 ann_file='labels.txt', img_dir='images', transform=model_name))
test_evaluator = dict(type='TopKAccuracy', topk=(1, 5))
test_cfg = dict(type='TestLoop')
# Calibration images: the train-like set, one image per class (protocol of ../shared/data/README).
# Batches of 100 as in FQ-ViT: its PTF quantizer picks the power-of-two factors on the last batch,
# so the batch size changes results slightly (benchmarks/cls_fidelity.py uses the same batches).
calib_dataloader = dict(
    batch_size=100, num_workers=2,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageNetDataset', data_root=f'{data_root}/imagenet/calib1000',
                 ann_file='labels.txt', img_dir='images', transform=model_name))
custom_hooks = [dict(type='CalibrationHook', dataloader=calib_dataloader)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=5))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
log_level = 'INFO'
