"""Quantized drop-in modules (``modules``)."""
