"""Quantized drop-in modules (``modules``); which quantizer each slot gets comes from the
converters in ``fqvit_det.convert``."""
from .modules import (AttentionQuantizers, IntegerInput, QuantConv2d, QuantLayerNorm,  # noqa: F401
                      QuantLinear, QuantModule)
