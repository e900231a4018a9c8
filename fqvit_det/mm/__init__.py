"""mmengine / mmdet glue. Importing it (``custom_imports=dict(imports=['fqvit_det'])``) registers
the dataset, models, metrics and hooks in the mmengine registries.

Needs the ``mm`` extra (``pip install fqvit-det[mm]``). The detection glue is registered when mmdet
is installed; an installed mmdet that fails to import (e.g. mmcv built against another torch)
raises here instead of silently leaving ``QuantizedDetector`` unregistered.
"""
from importlib.util import find_spec

from . import registry  # noqa: F401
from . import agreement, cls, hooks  # noqa: F401

if find_spec('mmdet') is not None:
    from . import det  # noqa: F401
