"""Pure-torch quantizers (no mmdet/mmengine imports). Importing this package registers them all."""
from .base import MIN_SCALE, Quantizer, round_ste  # noqa: F401
from .registry import (OBSERVERS, QUANTIZERS, build_observer, build_quantizer,  # noqa: F401
                       register_observer, register_quantizer)
from . import observers  # noqa: F401  (registers observers)
from .uniform import UniformQuantizer, integer_range, scale_zero_point  # noqa: F401

# Each family registers its quantizers on import.
from . import adalog, dynamic, gptq, lis, log, ptf, reparam, twin  # noqa: F401,E402
