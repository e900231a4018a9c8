"""Deployment exports of calibrated (simulated) models."""
from .onnx import ExportReport, UnsupportedQuantizerError, check_exportable, export_onnx  # noqa: F401
