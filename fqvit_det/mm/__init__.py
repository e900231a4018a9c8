"""mmengine / mmdet glue. Importing it (``custom_imports=dict(imports=['fqvit_det'])``) registers
the dataset, models, metric and hooks in the mmengine registries."""
from . import registry  # noqa: F401
from . import cls, hooks  # noqa: F401

try:  # detection glue needs mmdet (and mmcv's compiled ops)
    import mmdet  # noqa: F401
except ImportError:
    pass
else:
    from . import det  # noqa: F401
