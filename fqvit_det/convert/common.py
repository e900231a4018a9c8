"""Role-driven model conversion shared by every architecture.

An architecture is described by ``Rule``s: a glob over module paths, the kind of module expected
there, and which tensor role feeds each of its quantizer slots. ``convert_model`` walks the model
once, builds one quantizer per (module, role) from the ``QuantSpec`` and swaps modules in place.
"""
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from torch import nn

from ..nn.modules import AttentionQuantizers, QuantConv2d, QuantLayerNorm, QuantLinear

ATTENTION_ROLES = ('q', 'k', 'v', 'attn_logits', 'attn_probs', 'rel_pos_bias', 'attn_mask')


@dataclass
class Rule:
    pattern: str                      # fnmatch pattern over ``named_modules`` paths
    kind: str                         # 'linear' | 'conv' | 'layernorm' | 'attention'
    roles: Dict[str, Optional[str]] = field(default_factory=dict)
    # For 'attention': callable(module) that swaps the module's class to its quantized twin.
    attention_adapter: Optional[Callable[[nn.Module], None]] = None
    # For 'layernorm': Linears fed by this norm, as paths relative to the norm's parent
    # (RepQ-ViT reparameterizes the norm's output scales into them).
    feeds: Sequence[str] = ()


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _kind_matches(kind: str, mod: nn.Module) -> bool:
    if kind == 'linear':
        return type(mod) is nn.Linear or (isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear))
    if kind == 'conv':
        return isinstance(mod, nn.Conv2d) and not isinstance(mod, QuantConv2d)
    if kind == 'layernorm':
        return isinstance(mod, nn.LayerNorm) and not isinstance(mod, QuantLayerNorm)
    return True


def reparam_pairs(model: nn.Module, rules: Sequence[Rule]):
    """(norm path, [linear paths]) for every converted LayerNorm that feeds Linears."""
    pairs = []
    for path, mod in model.named_modules():
        if not isinstance(mod, QuantLayerNorm):
            continue
        rule = next((r for r in rules if r.kind == 'layernorm' and fnmatch.fnmatchcase(path, r.pattern)), None)
        if rule is None or not rule.feeds:
            continue
        parent = path.rpartition('.')[0]
        pairs.append((path, [f'{parent}.{f}' if parent else f for f in rule.feeds]))
    return pairs


def convert_model(model: nn.Module, spec, rules: Sequence[Rule]) -> List[str]:
    """Quantize ``model`` in place by ``rules``; returns the converted module paths.

    The first matching rule wins for each module. Quantizers are named ``<path>.<role>`` so
    calibration errors point at the exact tensor.
    """
    converted = []
    for path, mod in list(model.named_modules()):
        rule = next((r for r in rules if fnmatch.fnmatchcase(path, r.pattern)
                     and _kind_matches(r.kind, mod)), None)
        if rule is None:
            continue

        def build(slot):
            role = rule.roles.get(slot)
            return spec.build(role, f'{path}.{role}') if role else None

        if rule.kind == 'linear':
            _set_child(model, path, QuantLinear.from_float(mod, build('weight'), build('input')))
        elif rule.kind == 'conv':
            _set_child(model, path, QuantConv2d.from_float(mod, build('weight'), build('input')))
        elif rule.kind == 'layernorm':
            inq, outq = build('input'), build('output')
            integer = bool(spec.integer_layernorm and inq is not None
                           and hasattr(inq, 'shifted_codes') and outq is not None)
            _set_child(model, path, QuantLayerNorm.from_float(mod, inq, outq, integer=integer))
        elif rule.kind == 'attention':
            roles = {slot: rule.roles.get(slot, slot) for slot in ATTENTION_ROLES}
            built = {slot: (spec.build(role, f'{path}.{role}') if role else None)
                     for slot, role in roles.items()}
            if built['attn_probs'] is not None and getattr(built['attn_probs'], 'replaces_softmax', False):
                built['attn_logits'] = None  # Log-Int-Softmax quantizes the logits itself.
            mod.aq = AttentionQuantizers(q=built['q'], k=built['k'], v=built['v'],
                                         logits=built['attn_logits'], probs=built['attn_probs'],
                                         rel_pos_bias=built['rel_pos_bias'], mask=built['attn_mask'])
            rule.attention_adapter(mod)
        else:
            raise ValueError(f'unknown rule kind {rule.kind!r}')
        converted.append(path)
    if not converted:
        raise ValueError('no module of the model matched the conversion rules: is this the '
                         'architecture the converter was chosen for?')
    return converted


def swap_class(mod: nn.Module, quant_cls: type) -> None:
    """Give ``mod`` the quantized forward of ``quant_cls`` (a subclass of its own class)."""
    if not isinstance(mod, quant_cls.__mro__[1]):
        raise TypeError(f'{quant_cls.__name__} adapts {quant_cls.__mro__[1].__name__}, '
                        f'got {type(mod).__name__}')
    mod.__class__ = quant_cls
