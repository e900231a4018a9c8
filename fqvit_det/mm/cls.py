"""ImageNet classification on mmengine: dataset, timm eval transform, timm model wrapper, metric."""
import os
from typing import List, Optional, Sequence

from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from PIL import Image
from torch.utils.data import Dataset

from ..log import get_logger
from .checkpoint import load_into, load_weights
from .quant_model import QuantizableMixin

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def timm_eval_transform(model_name: str, **overrides):
    """timm's evaluation transform for a model (resize int(size/crop_pct), center crop, normalize)."""
    import timm
    from timm.data import create_transform, resolve_data_config
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    if pretrained_cfg is None:
        raise ValueError(f'unknown timm model {model_name!r} (no pretrained config to derive the eval transform)')
    data_cfg = resolve_data_config(dict(overrides), pretrained_cfg=pretrained_cfg.to_dict())
    return create_transform(**data_cfg, is_training=False)


@DATASETS.register_module()
class ImageNetDataset(Dataset):
    """ImageNet-style classification data.

    Two layouts: ``ann_file`` = a ``<file> <label>`` list (paths relative to
    ``data_root/img_dir``), or
    ``ann_file=None`` = class folders under ``data_root`` (sorted folder names = label order).
    ``transform`` (required: the model decides it) is a timm model name (its eval transform),
    ``dict(model_name=..., **overrides)`` (e.g. ``input_size=(3, 64, 64)``) or a callable.
    """

    def __init__(self, data_root: str, transform, ann_file: Optional[str] = 'labels.txt',
                 img_dir: str = '', max_images: Optional[int] = None, test_mode: bool = True):
        if not os.path.isdir(data_root):
            raise FileNotFoundError(f'ImageNetDataset: data_root {data_root!r} is not a directory')
        self.data_root = data_root
        self.samples = self._load(data_root, ann_file, img_dir)
        if max_images is not None:
            self.samples = self.samples[:max_images]
        if not self.samples:
            raise ValueError(f'ImageNetDataset: no images found under {data_root!r}')
        if not os.path.isfile(self.samples[0][0]):
            raise FileNotFoundError(f'ImageNetDataset: image {self.samples[0][0]!r} listed in '
                                    f'{ann_file!r} does not exist (check data_root / img_dir)')
        if isinstance(transform, str):
            self.transform = timm_eval_transform(transform)
        elif isinstance(transform, dict) and isinstance(transform.get('model_name'), str):
            overrides = {k: v for k, v in transform.items() if k != 'model_name'}
            self.transform = timm_eval_transform(transform['model_name'], **overrides)
        elif callable(transform):
            self.transform = transform
        else:
            raise ValueError('ImageNetDataset: transform must be a timm model name, '
                             f'dict(model_name=..., **overrides) or a callable, got {transform!r}')

    @staticmethod
    def _load(root, ann_file, img_dir=''):
        if ann_file:
            path = ann_file if os.path.isabs(ann_file) else os.path.join(root, ann_file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f'ImageNetDataset: ann_file {path!r} not found '
                                        '(expected lines "<file> <label>")')
            samples = []
            with open(path) as f:
                for lineno, line in enumerate(f, 1):
                    parts = line.split()
                    if not parts:
                        continue
                    if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                        raise ValueError(f'{path}:{lineno}: expected "<file> <label>", got {line.strip()!r}')
                    samples.append((os.path.join(root, img_dir, parts[0]), int(parts[1])))
            return samples
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        return [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMG_EXTENSIONS)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        path, label = self.samples[idx]
        with Image.open(path) as img:
            img = img.convert('RGB')
        return dict(inputs=self.transform(img), data_samples=dict(gt_label=label, img_path=path))


@MODELS.register_module()
class TimmClassifier(QuantizableMixin, BaseModel):
    """A timm classifier as an mmengine model, optionally quantized by ``quant_cfg``.

    Weights come from exactly one explicit source: ``checkpoint`` (a local safetensors or .pth
    file, loaded with ``weights_only=True``; a missing file is an error) or ``pretrained=True``
    (timm's hub download). With neither, the weights are random, and a warning says so.
    """
    supported_glue = ('calib_dataloader',)

    def __init__(self, model_name: str, pretrained: bool = False, checkpoint: Optional[str] = None,
                 quant_cfg: Optional[dict] = None, model_kwargs: Optional[dict] = None,
                 data_preprocessor=None, init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.check_quant_cfg(quant_cfg)  # fail on a bad quant_cfg before building anything
        if not isinstance(pretrained, bool):
            raise ValueError(f'TimmClassifier: pretrained must be True or False, got {pretrained!r}')
        if checkpoint and pretrained:
            raise ValueError(f'TimmClassifier: both checkpoint={checkpoint!r} and pretrained=True '
                             'were given; choose one weight source (remove pretrained=True to load '
                             'the file, or checkpoint to download timm\'s weights)')
        if checkpoint and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'TimmClassifier: checkpoint {checkpoint!r} not found (set '
                                    'model.checkpoint / --checkpoint to an existing file, or use '
                                    'checkpoint=None, pretrained=True to download timm\'s weights)')
        import timm
        logger = get_logger()
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
        if checkpoint:
            load_into(self.model, load_weights(checkpoint), checkpoint)
            logger.info(f'TimmClassifier: {model_name} weights from {checkpoint}')
        elif pretrained:
            logger.info(f'TimmClassifier: {model_name} weights from timm (pretrained=True)')
        else:
            logger.warning(f'TimmClassifier: {model_name} has RANDOM weights (no checkpoint and '
                           'pretrained=False): accuracies say nothing about quantization quality')
        self.model.eval()
        self.setup_quantization(quant_cfg)

    @property
    def quant_target(self):
        return self.model

    def convert_to_integer(self) -> None:
        from ..integer import to_integer
        self.model = to_integer(self.model)

    def calib_forward(self, model, batch):
        inputs = self.data_preprocessor(batch, False)['inputs']
        return model(inputs)

    def forward(self, inputs, data_samples=None, mode='predict'):
        logits = self.model(inputs)
        if mode == 'tensor':
            return logits
        if mode == 'predict':
            labels = data_samples['gt_label']  # default_collate: a dict of batched fields
            return [dict(logits=l, gt_label=int(y)) for l, y in zip(logits, labels)]
        raise ValueError(f'TimmClassifier supports mode "predict"/"tensor" only (inference), got {mode!r}')


@METRICS.register_module()
class TopKAccuracy(BaseMetric):
    """Top-1 / top-5 accuracy (%)."""
    default_prefix = 'imagenet'

    def __init__(self, topk: Sequence[int] = (1, 5), collect_device='cpu', prefix=None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = tuple(topk)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            pred = s['logits'].float().topk(max(self.topk)).indices.cpu()
            self.results.append(dict(label=int(s['gt_label']), pred=pred))

    def compute_metrics(self, results: List[dict]) -> dict:
        out = {}
        for k in self.topk:
            hits = sum(int(r['label'] in r['pred'][:k].tolist()) for r in results)
            out[f'top{k}'] = 100.0 * hits / max(len(results), 1)
        return out
