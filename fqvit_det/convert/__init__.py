"""Model conversion: which tensor role gets which quantizer, per architecture."""
from typing import Callable, Dict, List, Sequence

from torch import nn

from .common import ATTENTION_ROLES, Rule, convert_model, reparam_pairs, swap_class  # noqa: F401

# name -> (predicate(model), rules()) ; detection architectures register here too.
ARCHITECTURES: Dict[str, tuple] = {}


def register_architecture(name: str, predicate: Callable[[nn.Module], bool],
                          rules: Callable[[], Sequence[Rule]]) -> None:
    ARCHITECTURES[name] = (predicate, rules)


def _from_timm(model: nn.Module) -> bool:
    return any(c.__module__.startswith('timm.') for c in type(model).__mro__)


# timm is imported only when a timm model is converted (it is not a declared dependency).
def _is_timm_vit(model):
    if not _from_timm(model):
        return False
    from .timm_vit import is_timm_vit
    return is_timm_vit(model)


def _timm_vit_rules():
    from .timm_vit import vit_rules
    return vit_rules()


def _is_timm_swin(model):
    if not _from_timm(model):
        return False
    from .timm_swin import is_timm_swin
    return is_timm_swin(model)


def _timm_swin_rules():
    from .timm_swin import swin_rules
    return swin_rules()


register_architecture('timm_vit', _is_timm_vit, _timm_vit_rules)
register_architecture('timm_swin', _is_timm_swin, _timm_swin_rules)


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
