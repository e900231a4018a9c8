"""Role-driven model conversion shared by every architecture.

An architecture is described by ``Rule``s: a glob over module paths, the kind of module expected
there, and which tensor role feeds each of its quantizer slots. ``convert_model`` walks the model
once, builds one quantizer per (module, role) from the ``QuantSpec`` and swaps modules in place,
then links every LayerNorm to the quantizer that produced its input (FQ-ViT's residual stream).
"""
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..log import get_logger
from ..nn.modules import (AttentionQuantizers, IntegerInput, QuantConv2d, QuantLayerNorm,
                          QuantLinear, integer_output_ok)

ATTENTION_ROLES = ('q', 'k', 'v', 'attn_scores', 'attn_logits', 'attn_probs', 'rel_pos_bias',
                   'attn_mask')
KINDS = ('linear', 'conv', 'layernorm', 'attention', 'module')
# (model, norm path) -> path of the quantizer whose output the norm reads, or None
PathResolver = Callable[[nn.Module, str], Optional[str]]


@dataclass
class Rule:
    pattern: str                      # fnmatch pattern over ``named_modules`` paths
    kind: str                         # one of KINDS
    # slot -> role. linear/conv slots: weight, input, output; layernorm: input, output;
    # attention: ATTENTION_ROLES (default: the slot's own name); module: the adapter's slots.
    roles: Dict[str, Optional[str]] = field(default_factory=dict)
    # For 'attention': callable(module) that swaps the module's class to its quantized twin.
    attention_adapter: Optional[Callable[[nn.Module], None]] = None
    # For 'module': the class the module must be, and callable(module, {slot: quantizer or None})
    # that attaches the quantizers and swaps in the quantized forward.
    module_type: Optional[type] = None
    adapter: Optional[Callable[[nn.Module, dict], None]] = None
    # For 'layernorm': Linears fed by this norm, as paths relative to the norm's parent
    # (RepQ-ViT reparameterizes the norm's output scales into them).
    feeds: Sequence[str] = ()
    # For 'layernorm': where its input was quantized (FQ-ViT: the residual stream), and how its
    # channels relate to that quantizer's (``(k, 'repeat' | 'interleave')`` for patch merging).
    input_from: Optional[PathResolver] = None
    input_expand: Tuple[int, str] = (1, 'repeat')
    # For 'layernorm': a quantizer applied downstream whose grid the integer output uses.
    output_to: Optional[PathResolver] = None
    # A rule that may match nothing (e.g. timm ViT's ``norm`` vs ``fc_norm``); any other rule
    # that matches no module is an error.
    optional: bool = False


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _kind_matches(rule: Rule, mod: nn.Module) -> bool:
    kind = rule.kind
    if kind == 'linear':
        return type(mod) is nn.Linear or (isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear))
    if kind == 'conv':
        return isinstance(mod, nn.Conv2d) and not isinstance(mod, QuantConv2d)
    if kind == 'layernorm':
        return isinstance(mod, nn.LayerNorm) and not isinstance(mod, QuantLayerNorm)
    if kind == 'module':
        return isinstance(mod, rule.module_type)
    return True


def _device_of(mod: nn.Module) -> Optional[torch.device]:
    for t in mod.parameters():
        return t.device
    for t in mod.buffers():
        return t.device
    return None


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


def find_quantizer(model: nn.Module, path: Optional[str]):
    """The quantizer at ``path`` (``<module path>.<attribute>``), or None when that slot is empty.

    The module part must exist (a wrong path in a rule is a bug, reported as such).
    """
    if path is None:
        return None
    parent_path, _, attr = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    return getattr(parent, attr, None)


def _check_rule(rule: Rule) -> None:
    if rule.kind not in KINDS:
        raise ValueError(f'conversion rule {rule.pattern!r}: unknown kind {rule.kind!r}; expected one of {KINDS}')
    if rule.kind == 'module' and (rule.module_type is None or rule.adapter is None):
        raise ValueError(f'conversion rule {rule.pattern!r}: kind "module" needs module_type and adapter')


def convert_model(model: nn.Module, spec, rules: Sequence[Rule]) -> List[str]:
    """Quantize ``model`` in place by ``rules``; returns the converted module paths.

    The first matching rule wins for each module. Quantizers are named ``<path>.<role>`` so
    calibration errors point at the exact tensor. A rule that matches no module is an error
    naming the rule, unless the rule is ``optional``.
    """
    for rule in rules:
        _check_rule(rule)
    converted, rule_of = [], {}
    for path, mod in list(model.named_modules()):
        rule = next((r for r in rules if fnmatch.fnmatchcase(path, r.pattern) and _kind_matches(r, mod)), None)
        if rule is None:
            continue
        device = _device_of(mod)

        def build(role, slot=None):
            if not role:
                return None
            name = slot or role
            q = spec.build(role, f'{path}.{name}' if path else name)
            return q.to(device) if q is not None and device is not None else q

        if rule.kind == 'linear':
            slots = {s: build(rule.roles.get(s)) for s in ('weight', 'input', 'output')}
            _set_child(model, path, QuantLinear.from_float(mod, slots['weight'], slots['input'], slots['output']))
        elif rule.kind == 'conv':
            slots = {s: build(rule.roles.get(s)) for s in ('weight', 'input', 'output')}
            _set_child(model, path, QuantConv2d.from_float(mod, slots['weight'], slots['input'], slots['output']))
        elif rule.kind == 'layernorm':
            inq, outq = build(rule.roles.get('input')), build(rule.roles.get('output'))
            integer = integer_layernorm_on(spec)
            if integer and inq is not None and IntegerInput.supports(inq) and outq is not None \
                    and not integer_output_ok(outq):
                get_logger().warning(f'{path}: integer LayerNorm needs a per-tensor unsigned uniform output '
                            f'quantizer, got {type(outq).__name__}; this norm runs the float '
                            'LayerNorm between its input and output quantizers')
            _set_child(model, path, QuantLayerNorm.from_float(mod, inq, outq, integer=integer))
        elif rule.kind == 'attention':
            built = {slot: build(rule.roles.get(slot, slot)) for slot in ATTENTION_ROLES}
            if built['attn_probs'] is not None and getattr(built['attn_probs'], 'replaces_softmax', False):
                built['attn_logits'] = None  # Log-Int-Softmax quantizes the logits itself.
            mod.aq = AttentionQuantizers(q=built['q'], k=built['k'], v=built['v'],
                                         scores=built['attn_scores'], logits=built['attn_logits'],
                                         probs=built['attn_probs'], rel_pos_bias=built['rel_pos_bias'],
                                         mask=built['attn_mask'])
            rule.attention_adapter(mod)
        else:  # 'module'
            rule.adapter(mod, {slot: build(role, slot) for slot, role in rule.roles.items()})
        converted.append(path)
        rule_of[path] = rule
    if not converted:
        raise ValueError('no module of the model matched the conversion rules: is this the '
                         'architecture the converter was chosen for?')
    used = {id(r) for r in rule_of.values()}
    unmatched = [r for r in rules if id(r) not in used and _required(r, spec)]
    if unmatched:
        raise ValueError(f'conversion rules matched no module of {type(model).__name__}: '
                         + ', '.join(f'{r.pattern!r} ({r.kind})' for r in unmatched)
                         + ': the model does not have the structure these rules describe')
    _link_layernorms(model, rule_of)
    return converted


def integer_layernorm_on(spec) -> bool:
    """FQ-ViT runs its LayerNorms in integer mode exactly when PTF is on (``config.py``:
    ``INT_NORM = ptf``): then every norm is integer, including those fed by a layer-wise uniform
    quantizer (Swin's patch-embedding norm). Without a PTF residual / norm input, float LayerNorm."""
    if not spec.integer_layernorm:
        return False
    return any((spec.roles.get(role) or {}).get('type') == 'PTFQuantizer'
               for role in ('residual', 'ln_input'))


def _required(rule: Rule, spec) -> bool:
    """A rule must match unless it is optional, or is a module adapter all of whose roles are
    float in this spec (e.g. the residual-stream block adapter under a preset without it)."""
    if rule.optional:
        return False
    if rule.kind == 'module':
        return any(spec.roles.get(role) is not None for role in rule.roles.values() if role)
    return True


def _link_layernorms(model: nn.Module, rule_of: Dict[str, Rule]) -> None:
    """Point each LayerNorm at the quantizer that produced its input and, optionally, at the
    downstream quantizer whose grid its integer output uses."""
    for path, rule in rule_of.items():
        if rule.kind != 'layernorm':
            continue
        norm = model.get_submodule(path)
        if rule.input_from is not None:
            source = find_quantizer(model, rule.input_from(model, path))
            try:
                norm.consume(source, *rule.input_expand)
            except ValueError as err:
                raise ValueError(f'{path}: {err}') from None
        if rule.output_to is not None and norm.out_quantizer is None:
            norm.emit_to(find_quantizer(model, rule.output_to(model, path)))


def swap_class(mod: nn.Module, quant_cls: type) -> None:
    """Give ``mod`` the quantized forward of ``quant_cls``: a subclass of ``mod``'s own module
    class, possibly behind a forward mixin (``openmmlab_swin.py``)."""
    float_cls = next(b for b in quant_cls.__bases__ if issubclass(b, nn.Module))
    if not isinstance(mod, float_cls):
        raise TypeError(f'{quant_cls.__name__} adapts {float_cls.__name__}, got {type(mod).__name__}')
    mod.__class__ = quant_cls
