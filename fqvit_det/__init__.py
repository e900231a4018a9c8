"""fqvit-det: post-training quantization of vision transformers (FQ-ViT, PTQ4ViT, RepQ-ViT, AdaLog).

``import fqvit_det`` registers the quantizers and, when mmengine is installed, the mm components
(so ``custom_imports=dict(imports=['fqvit_det'])`` in an mmdet config is all a user adds).
"""
from . import quantizers  # noqa: F401

__version__ = '0.1.0'

try:
    import mmengine  # noqa: F401
except ImportError:  # the quantizer core works without OpenMMLab
    pass
else:
    from . import mm  # noqa: F401
