"""A tiny synthetic ImageNet-style folder and a classification config on it (no shared data).

The model is a one-block ViT-Tiny on 32×32 images with random weights: enough for every step of
``tools/test.py`` (config, model, quantization, calibration, evaluation, state file) in seconds.
"""
import importlib.util
import os
import os.path as osp

import numpy as np
from PIL import Image

MODEL = dict(type='TimmClassifier', model_name='vit_tiny_patch16_224', depth=1, img_size=32,
             num_classes=4)
PIPELINE = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]  # the images are 32×32
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
QUANT_CFG = dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4, calib_images=4)


def make_images(root, n: int = 6, size: int = 32, seed: int = 0) -> str:
    """``root/images/*.png`` and ``root/labels.txt`` (``<file> <label>`` lines); returns root."""
    rng = np.random.default_rng(seed)
    img_dir = osp.join(root, 'images')
    os.makedirs(img_dir, exist_ok=True)
    lines = []
    for i in range(n):
        name = f'img{i}.png'
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(osp.join(img_dir, name))
        lines.append(f'{name} {i % 4}')
    with open(osp.join(root, 'labels.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return root


def config_text(data_root: str, quant_cfg=QUANT_CFG, model=MODEL) -> str:
    """A complete mmpretrain config (Python source) for ``tools/test.py``; ``quant_cfg`` is top level."""
    loader = dict(batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
                  dataset=dict(type='CustomDataset', data_root=data_root, ann_file='labels.txt',
                               data_prefix='images', pipeline=PIPELINE))
    return '\n'.join([
        "default_scope = 'mmpretrain'",
        "custom_imports = dict(imports=['fqvit_det'], allow_failed_imports=False)",
        'randomness = dict(seed=0)',
        f'model = {model!r}',
        f'quant_cfg = {quant_cfg!r}',
        "data_preprocessor = dict(num_classes=4, mean=[123.675, 116.28, 103.53], "
        "std=[58.395, 57.12, 57.375], to_rgb=True)",
        f'test_dataloader = {loader!r}',
        "test_evaluator = dict(type='Accuracy', topk=(1,))",
        "test_cfg = dict(type='TestLoop')",
        "env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))",
        "default_hooks = dict(logger=dict(type='LoggerHook', interval=1))",
        "log_level = 'INFO'",
    ]) + '\n'


def write_config(path, data_root: str, **kwargs) -> str:
    with open(path, 'w') as f:
        f.write(config_text(data_root, **kwargs))
    return str(path)


def load_tool(name: str):
    """``tools/<name>.py`` as a module (not via sys.path: the standard library has a ``test``)."""
    spec = importlib.util.spec_from_file_location(f'fqvit_tools_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
