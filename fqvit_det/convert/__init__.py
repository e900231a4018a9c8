"""Model conversion: which tensor role gets which quantizer, per architecture."""
import importlib
from typing import Callable, Dict, List, Sequence

from torch import nn

from .common import ATTENTION_ROLES, Rule, convert_model, reparam_pairs, swap_class  # noqa: F401

# name -> (predicate(model), rules()) ; detection architectures register here too.
ARCHITECTURES: Dict[str, tuple] = {}


def register_architecture(name: str, predicate: Callable[[nn.Module], bool],
                          rules: Callable[[], Sequence[Rule]]) -> None:
    ARCHITECTURES[name] = (predicate, rules)


def _from_package(model: nn.Module, package: str) -> bool:
    return any(c.__module__.startswith(f'{package}.') for c in type(model).__mro__)


def _register_lazy(name: str, package: str, module: str, predicate: str, rules: str) -> None:
    """Register an architecture of an optional ``package`` (timm, mmpretrain) whose converter
    module (which imports that package) is imported only when a model of that package is
    converted: neither is a dependency of the core."""
    def converter():
        return importlib.import_module(f'{__name__}.{module}')

    register_architecture(name, lambda m: _from_package(m, package) and getattr(converter(), predicate)(m),
                          lambda: getattr(converter(), rules)())


_register_lazy('timm_vit', 'timm', 'timm_vit', 'is_timm_vit', 'vit_rules')
_register_lazy('timm_swin', 'timm', 'timm_swin', 'is_timm_swin', 'swin_rules')
_register_lazy('mmpretrain_vit', 'mmpretrain', 'mmpretrain_vit', 'is_mmpretrain_vit', 'mmpretrain_vit_rules')
_register_lazy('mmpretrain_swin', 'mmpretrain', 'mmpretrain_swin', 'is_mmpretrain_swin',
               'mmpretrain_swin_rules')


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
