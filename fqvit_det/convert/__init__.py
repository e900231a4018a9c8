"""Model conversion: which tensor role gets which quantizer, per architecture."""
from typing import Callable, Dict, List, Sequence

from torch import nn

from .common import ATTENTION_ROLES, Rule, convert_model, reparam_pairs, swap_class  # noqa: F401

# name -> (predicate(model), rules()) ; detection architectures register here too.
ARCHITECTURES: Dict[str, tuple] = {}


def register_architecture(name: str, predicate: Callable[[nn.Module], bool],
                          rules: Callable[[], Sequence[Rule]]) -> None:
    ARCHITECTURES[name] = (predicate, rules)


def _register_builtin():
    from . import timm_swin, timm_vit
    register_architecture('timm_vit', timm_vit.is_timm_vit, timm_vit.vit_rules)
    register_architecture('timm_swin', timm_swin.is_timm_swin, timm_swin.swin_rules)


_register_builtin()


def detect_architecture(model: nn.Module) -> str:
    for name, (pred, _) in ARCHITECTURES.items():
        if pred(model):
            return name
    raise TypeError(f'no converter for {type(model).__name__}; supported: {sorted(ARCHITECTURES)}')


def quantize_model(model: nn.Module, spec, arch: str = None, rules: Sequence[Rule] = None) -> List[str]:
    """Convert ``model`` in place according to ``spec``; returns converted module paths.

    The LayerNorm → Linear pairs used by the RepQ reparameterization are stored on the model as
    ``model.fqvit_reparam_pairs``.
    """
    if rules is None:
        arch = arch or detect_architecture(model)
        rules = ARCHITECTURES[arch][1]()
    converted = convert_model(model, spec, rules)
    model.fqvit_reparam_pairs = reparam_pairs(model, rules)
    return converted
