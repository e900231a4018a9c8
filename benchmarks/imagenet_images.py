"""ImageNet subset images for the benchmarks, through the classification configs' own mmpretrain
pipeline and data preprocessor (``configs/cls/_base_imagenet.py``): the pixels users' runs see."""
import os.path as osp

HERE = osp.dirname(osp.abspath(__file__))


def load_images(root, n):
    """The first ``n`` images of the subset at ``root`` (``labels.txt`` + ``images/``) as one
    normalized batch, and their labels."""
    import torch
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmpretrain.registry import DATASETS, MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(osp.join(HERE, '..', 'configs', 'cls', '_base_imagenet.py'))
    ds = DATASETS.build(dict(type='ImageNet', data_root=root, ann_file='labels.txt', data_prefix='images',
                             pipeline=cfg.test_pipeline, indices=n))
    pre = MODELS.build(dict(type='ClsDataPreprocessor', **cfg.data_preprocessor))
    xs, ys = [], []
    for i in range(0, len(ds), 100):  # preprocess in chunks (peak memory)
        data = pre(pseudo_collate([ds[j] for j in range(i, min(i + 100, len(ds)))]), False)
        xs.append(data['inputs'])
        ys.append(torch.cat([s.gt_label for s in data['data_samples']]))
    return torch.cat(xs), torch.cat(ys)
