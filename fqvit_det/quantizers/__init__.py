"""Pure-torch quantizers (no mmdet/mmengine imports). Importing this package registers them all."""
from .base import MIN_SCALE, Quantizer, round_ste  # noqa: F401
from .registry import (OBSERVERS, QUANTIZERS, build_observer, build_quantizer,  # noqa: F401
                       register_observer, register_quantizer)
from . import observers  # noqa: F401  (registers observers)
from .uniform import UniformQuantizer, integer_range, scale_zero_point  # noqa: F401

# Families written in their own files register themselves on import.
import importlib as _importlib
for _mod in ('ptf', 'log', 'adalog', 'twin', 'search', 'reparam'):
    try:
        _importlib.import_module(f'{__name__}.{_mod}')
    except ModuleNotFoundError as _err:  # pragma: no cover - only while a family is being written
        if _err.name != f'{__name__}.{_mod}':
            raise
