"""Classification on mmpretrain: a wrapper that quantizes any mmpretrain classifier.

Datasets (``ImageNet`` / ``CustomDataset``), pipelines, ``Accuracy`` and the classifiers
themselves (``ImageClassifier`` with mmpretrain's ViT/DeiT/Swin, or mmpretrain's own
``TimmClassifier`` around a timm model) are mmpretrain's; this module only adds
``QuantizedClassifier``, which ``tools/test.py`` puts around the config's ``model`` when the config
has a ``quant_cfg`` (as ``QuantizedDetector`` does for mmdet).
"""
import os
from typing import Optional

from mmengine.model import BaseModel
from mmengine.registry import MODELS

from ..convert.timm_to_mmpretrain import looks_like_timm_vit, timm_vit_to_mmpretrain
from ..log import get_logger
from .checkpoint import load_into, load_weights
from .quant_model import QuantizableMixin


def _is_timm_classifier(classifier) -> bool:
    return type(classifier).__name__ == 'TimmClassifier' and hasattr(classifier, 'model')


def _has_pretrained_init(cfg: dict) -> bool:
    """The classifier config loads weights itself (``init_cfg`` of type Pretrained or timm's
    ``pretrained=True``)."""
    inits = [cfg.get('init_cfg')] + [(cfg.get(part) or {}).get('init_cfg') for part in ('backbone', 'head')]
    inits = [i for init in inits for i in (init if isinstance(init, (list, tuple)) else [init]) if i]
    return bool(cfg.get('pretrained')) or any(i.get('type') == 'Pretrained' for i in inits)


def load_classifier_weights(classifier, path: str) -> None:
    """Load ``path`` (safetensors or weights-only .pth) strictly into an mmpretrain classifier.

    mmpretrain's ``TimmClassifier`` takes timm key names. An ``ImageClassifier`` with a
    ``VisionTransformer`` backbone also takes a timm ViT/DeiT file: its keys are renamed on the fly
    (``fqvit_det.convert.timm_to_mmpretrain``; ``tools/convert_timm_to_mmpretrain.py`` writes the
    renamed file once).
    """
    state = load_weights(path)
    own = classifier.state_dict()
    if not _is_timm_classifier(classifier) and not set(state) & set(own) and looks_like_timm_vit(state):
        from ..convert import detect_architecture
        if detect_architecture(classifier) != 'mmpretrain_vit':
            raise ValueError(f'{path} holds timm ViT weights, but the classifier is a '
                             f'{type(classifier.backbone).__name__}; timm keys are converted only '
                             'for mmpretrain VisionTransformer backbones')
        state = timm_vit_to_mmpretrain(state)
        get_logger().info(f'QuantizedClassifier: {path} has timm ViT key names; renamed to '
                          'mmpretrain ImageClassifier keys')
    load_into(classifier, state, path)


@MODELS.register_module()
class QuantizedClassifier(QuantizableMixin, BaseModel):
    """Wraps any mmpretrain classifier config and quantizes it by ``quant_cfg``.

    Args:
        classifier: the mmpretrain model config (``ImageClassifier``, ``TimmClassifier``, ...).
        quant_cfg: the quantization recipe (None: the float classifier).
        checkpoint: weights (safetensors or a .pth loaded weights-only), loaded strictly; a config's
            ``load_from`` becomes this (tools/test.py). Without it, and without a ``Pretrained``
            init or timm ``pretrained=True`` in the classifier config, the weights are random and a
            warning says so.

    What is quantized: an ``ImageClassifier`` as a whole (backbone + head, rules chosen by its
    backbone type); a ``TimmClassifier``'s timm model (timm rules).
    """
    supported_glue = ('calib_dataloader',)

    def __init__(self, classifier: dict, quant_cfg: Optional[dict] = None,
                 checkpoint: Optional[str] = None, data_preprocessor=None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.check_quant_cfg(quant_cfg)  # fail on a bad quant_cfg before building anything
        if checkpoint and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'QuantizedClassifier: checkpoint {checkpoint!r} not found (set '
                                    'load_from / --checkpoint to an existing file)')
        from mmpretrain.registry import MODELS as CLS_MODELS
        from mmpretrain.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        classifier = dict(classifier)
        if data_preprocessor is not None:
            classifier['data_preprocessor'] = data_preprocessor
        logger = get_logger()
        from mmengine.registry import DefaultScope
        with DefaultScope.overwrite_default_scope('mmpretrain'):  # whatever scope the caller set
            self.classifier = CLS_MODELS.build(classifier)
        self.data_preprocessor = self.classifier.data_preprocessor
        name = classifier.get('model_name') or classifier.get('type')
        if checkpoint:
            load_classifier_weights(self.classifier, checkpoint)
            logger.info(f'QuantizedClassifier: {name} weights from {checkpoint}')
        elif _has_pretrained_init(classifier):
            self.classifier.init_weights()
            logger.info(f'QuantizedClassifier: {name} weights from its own pretrained init')
        else:
            logger.warning(f'QuantizedClassifier: {name} has RANDOM weights (no checkpoint / '
                           'load_from): accuracies say nothing about quantization quality')
        self.classifier.eval()
        self.setup_quantization(quant_cfg)
        self._register_load_state_dict_pre_hook(self._accept_classifier_keys)

    @staticmethod
    def _accept_classifier_keys(state_dict, prefix, *args):
        """A plain classifier checkpoint (mmpretrain's ``backbone.* / head.*`` keys, as mmpretrain's
        own ``tools/test.py`` loads it into the model through mmengine) lands in ``classifier``."""
        inner = prefix + 'classifier.'
        if any(k.startswith(inner) for k in state_dict):
            return
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[inner + key[len(prefix):]] = state_dict.pop(key)

    @property
    def quant_target(self):
        return self.classifier.model if _is_timm_classifier(self.classifier) else self.classifier

    def convert_to_integer(self) -> None:
        """Replace the calibrated timm model by its integer twin (``fqvit_det.integer.to_integer``)."""
        if not _is_timm_classifier(self.classifier):
            raise NotImplementedError(
                f'--integer: the integer converter handles timm ViT/DeiT models (configs with '
                f'TimmClassifier); {type(self.classifier).__name__} is not converted yet')
        from ..integer import to_integer
        self.classifier.model = to_integer(self.classifier.model)

    def calib_forward(self, model, batch):
        """Classification logits of one calibration batch (the Hessian-guided search uses them)."""
        inputs = self.data_preprocessor(batch, False)['inputs']
        return model(inputs) if model is not self.classifier else model(inputs, mode='tensor')

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.classifier(inputs, data_samples, mode=mode)

    def val_step(self, data):
        return self.classifier.val_step(data)

    def test_step(self, data):
        return self.classifier.test_step(data)
