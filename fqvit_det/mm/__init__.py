"""mmengine / mmdet / mmpretrain glue. Importing it (``custom_imports=dict(imports=['fqvit_det'])``)
registers the wrappers (``QuantizedClassifier``, ``QuantizedDetector``), the timm detection backbone,
the calibration hook and the detection agreement metric in the mmengine registries; datasets,
pipelines and accuracy metrics are mmpretrain's / mmdet's.

Needs the ``mm`` extra (``pip install fqvit-det[mm]``). The detection glue is registered when mmdet
is installed; an installed mmdet that fails to import (e.g. mmcv built against another torch)
raises here instead of silently leaving ``QuantizedDetector`` unregistered.
"""
from importlib.util import find_spec

from . import registry  # noqa: F401
from . import agreement, cls, hooks  # noqa: F401

if find_spec('mmdet') is not None:
    from . import det  # noqa: F401
