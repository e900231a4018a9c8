"""Glue between an mmengine model wrapper and the pure quantization pipeline."""
from typing import Optional

from ..convert import quantize_model
from ..presets import QUANT_CFG_KEYS, make_spec
from ..validation import QuantConfigError, expect_bool, expect_choice, expect_dict

# quant_cfg keys consumed by the mm glue rather than by the preset.
SCOPES = ('full', 'backbone')
GLUE_KEYS = ('scope', 'calib_dataloader', 'fold_bn')


def split_quant_cfg(quant_cfg: dict, outputs_logits: bool = True):
    """Validate ``quant_cfg`` completely and split it into a ``QuantSpec`` and the glue keys.

    Pure validation (no model, no data): ``tools/test.py`` calls it before building anything.
    ``outputs_logits``: the model's calibration forward returns classification logits (False for
    detectors, where the Hessian-guided search metric cannot run).
    """
    quant_cfg = expect_dict('quant_cfg', quant_cfg, allow_none=False)
    for key in quant_cfg:
        if key not in QUANT_CFG_KEYS and key not in GLUE_KEYS:
            raise QuantConfigError(f'quant_cfg.{key}', 'unknown key; expected one of '
                                                       f'{sorted(QUANT_CFG_KEYS + GLUE_KEYS)}')
    glue = {k: quant_cfg.pop(k) for k in GLUE_KEYS if k in quant_cfg}
    if 'scope' in glue:
        expect_choice('quant_cfg.scope', glue['scope'], SCOPES)
    if 'fold_bn' in glue:
        expect_bool('quant_cfg.fold_bn', glue['fold_bn'])
    if 'calib_dataloader' in glue:
        loader = expect_dict('quant_cfg.calib_dataloader', glue['calib_dataloader'])
        if loader is not None and not isinstance(loader.get('dataset'), dict):
            raise QuantConfigError('quant_cfg.calib_dataloader.dataset',
                                   'expected a dataset config dict (the dataloader config of '
                                   f'mmengine), got {loader.get("dataset")!r}')
    spec = make_spec(**quant_cfg)
    if spec.search_cfg.get('metric') == 'hessian' and not outputs_logits:
        raise QuantConfigError('quant_cfg.search_cfg.metric',
                               f"'hessian' (the {spec.method} default) needs classification logits, "
                               'but a detector outputs detections; set '
                               "quant_cfg.search_cfg.metric='mse' to search on the layer-output MSE")
    return spec, glue


class QuantizableMixin:
    """Converts ``self.quant_target`` by ``quant_cfg``; quantizers start in float mode.

    The ``CalibrationHook`` later calibrates through ``self.calib_forward(model, batch)``.
    """
    quant_spec = None
    quant_glue: dict = {}
    # Glue keys this wrapper understands; others are an error (e.g. ``scope`` on a classifier).
    supported_glue = GLUE_KEYS
    #: ``calib_forward`` returns classification logits (what search_cfg.metric='hessian' needs)
    outputs_logits = True

    @property
    def quant_target(self):
        raise NotImplementedError

    def convert_to_integer(self) -> None:
        """Replace the calibrated quantized model by its integer twin (``tools/test.py --integer``)."""
        raise NotImplementedError(f'{type(self).__name__} has no integer execution yet '
                                  '(supported: timm classifiers, QuantizedDetector)')

    def conversion_rules(self, glue: dict):
        """Architecture rules for ``quantize_model``; None = detect from the model type."""
        return None

    def check_quant_cfg(self, quant_cfg: Optional[dict]):
        """Validate before any model work; returns (spec, glue) or (None, {}) without quant_cfg."""
        if not quant_cfg:
            return None, {}
        spec, glue = split_quant_cfg(quant_cfg, self.outputs_logits)
        for key in glue:
            if key not in self.supported_glue:
                raise QuantConfigError(f'quant_cfg.{key}', f'not supported by {type(self).__name__} '
                                                           f'(it supports {list(self.supported_glue)})')
        return spec, glue

    def setup_quantization(self, quant_cfg: Optional[dict]) -> None:
        self.quant_spec, self.quant_glue = self.check_quant_cfg(quant_cfg)
        if self.quant_spec is not None:
            self.quantized_modules = quantize_model(self.quant_target, self.quant_spec,
                                                    rules=self.conversion_rules(self.quant_glue))
