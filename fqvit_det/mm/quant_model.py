"""Glue between an mmengine model wrapper and the pure quantization pipeline."""
from typing import Optional

from ..convert import quantize_model
from ..presets import make_spec

# quant_cfg keys consumed by the mm glue rather than by the preset.
GLUE_KEYS = ('scope', 'calib_dataloader', 'fold_bn')


def split_quant_cfg(quant_cfg: dict):
    if not isinstance(quant_cfg, dict):
        raise ValueError(f'quant_cfg must be a dict, got {type(quant_cfg).__name__}')
    quant_cfg = dict(quant_cfg)
    glue = {k: quant_cfg.pop(k) for k in GLUE_KEYS if k in quant_cfg}
    return make_spec(**quant_cfg), glue


class QuantizableMixin:
    """Converts ``self.quant_target`` by ``quant_cfg``; quantizers start in float mode.

    The ``CalibrationHook`` later calibrates through ``self.calib_forward(model, batch)``.
    """
    quant_spec = None
    quant_glue: dict = {}

    @property
    def quant_target(self):
        raise NotImplementedError

    def conversion_rules(self, glue: dict):
        """Architecture rules for ``quantize_model``; None = detect from the model type."""
        return None

    def setup_quantization(self, quant_cfg: Optional[dict]) -> None:
        if not quant_cfg:
            return
        self.quant_spec, self.quant_glue = split_quant_cfg(quant_cfg)
        self.quantized_modules = quantize_model(self.quant_target, self.quant_spec,
                                                rules=self.conversion_rules(self.quant_glue))
