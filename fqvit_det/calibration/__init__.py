"""Calibration: the runner, its exact distributed reduction and the RepQ reparameterization step.

``from fqvit_det.calibration import CalibrationRunner`` is the entry point; the model-walk helpers
of ``fqvit_det.walk`` are re-exported for existing callers.
"""
from ..walk import (activation_quantizers, named_quantizers, refresh,  # noqa: F401
                    set_quant_mode, weight_quantizer_ids)
from .distributed import shard_batches, world_info  # noqa: F401
from .reparam import reparameterize  # noqa: F401
from .runner import CalibrationRunner, batch_images, move_to  # noqa: F401
