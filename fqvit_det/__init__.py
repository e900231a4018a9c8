"""fqvit-det: post-training quantization of vision transformers (FQ-ViT, PTQ4ViT, RepQ-ViT, AdaLog).

``import fqvit_det`` registers the quantizers and, when mmengine is installed, the mm components
(so ``custom_imports=dict(imports=['fqvit_det'])`` in an mmdet config is all a user adds). The core
(quantizers, presets, calibration, state files) needs only torch, numpy and safetensors; the timm
model converters need the ``timm`` extra and the OpenMMLab glue the ``mm`` extra.
"""
from importlib.util import find_spec

from . import quantizers  # noqa: F401

__version__ = '0.1.0'

if find_spec('mmengine') is not None:  # an installed but broken mmengine raises, not hides
    from . import mm  # noqa: F401
