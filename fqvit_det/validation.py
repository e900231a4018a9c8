"""Validation of ``quant_cfg`` values, before any model or data is built.

Pure Python plus the quantizer registry (no mmengine). Every check raises ``QuantConfigError``
(a ``ValueError``) whose message starts with the full key (``quant_cfg.roles.ln_output.ch_axis``)
and says what was expected. Values stored in a ``QuantSpec`` are frozen, JSON-like copies
(``FrozenDict`` / tuples), so a spec cannot be changed after it was validated.
"""
from typing import Any, Iterable, Mapping, Optional


class QuantConfigError(ValueError):
    """A malformed ``quant_cfg`` value; ``key`` is the dotted key it names."""

    def __init__(self, key: str, message: str):
        super().__init__(f'{key}: {message}')
        self.key = key


def _describe(value) -> str:
    return f'{value!r} ({type(value).__name__})'


def expect_bool(key: str, value) -> bool:
    """A real bool: 'no', 0/1, 2 and None are rejected (``ptf='no'`` is truthy)."""
    if not isinstance(value, bool):
        raise QuantConfigError(key, f'expected True or False, got {_describe(value)}')
    return value


def expect_int(key: str, value, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An int (not a bool, not a float or string) in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise QuantConfigError(key, f'expected an int{_range(low, high)}, got {_describe(value)}')
    if (low is not None and value < low) or (high is not None and value > high):
        raise QuantConfigError(key, f'expected an int{_range(low, high)}, got {value!r}')
    return value


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f' in {low}..{high}'
    if low is not None:
        return f' >= {low}'
    return f' <= {high}' if high is not None else ''


def expect_choice(key: str, value, choices: Iterable):
    choices = tuple(choices)
    # `in` alone would accept True for 1 and unhashable values would raise: compare by type too.
    if not any(value == c and type(value) is type(c) for c in choices):
        raise QuantConfigError(key, f'expected one of {choices}, got {_describe(value)}')
    return value


def expect_dict(key: str, value, allow_none: bool = True) -> Optional[dict]:
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        want = 'a dict or None' if allow_none else 'a dict'
        raise QuantConfigError(key, f'expected {want}, got {_describe(value)}')
    for k in value:
        if not isinstance(k, str):
            raise QuantConfigError(key, f'keys must be strings, got {_describe(k)}')
    return dict(value)


# --- frozen JSON-like values -------------------------------------------------------------------
class FrozenDict(dict):
    """A dict that refuses mutation; pickles, deep-copies and JSON-serializes like a dict."""

    def _refuse(self, *args, **kwargs):
        raise TypeError('a QuantSpec is immutable: build a new one with make_spec(...) or '
                        'dataclasses.replace(spec, ...)')

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def freeze(value, key: str):
    """A frozen copy of a JSON-like value (None, bool, int, float, str, lists, dicts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise QuantConfigError(key, f'keys must be strings, got {_describe(k)}')
            out[k] = freeze(v, f'{key}.{k}')
        return FrozenDict(out)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v, f'{key}[{i}]') for i, v in enumerate(value))
    raise QuantConfigError(key, 'expected a plain config value (None, bool, int, float, str, list, '
                                f'dict), got {type(value).__name__}')


def thaw(value):
    """The plain (mutable, JSON-serializable) form of a frozen value: dicts and lists."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def _expect_axis(key: str, value):
    if value is not None:
        expect_int(key, value)
    return value


# Arguments shared by several quantizers, checked by name so the message names the exact key;
# the constructors check their own arguments as well (the build below).
COMMON_ARGS = {
    'bits': lambda key, v: expect_int(key, v, 2, 16),
    'ch_axis': _expect_axis,
    'symmetric': expect_bool,
    'signed': lambda key, v: v if v is None else expect_bool(key, v),
}


# --- roles ---------------------------------------------------------------------------------------
def check_role_cfg(role: str, cfg) -> Optional[FrozenDict]:
    """``None`` or ``dict(type=<registered quantizer>, ...)`` whose quantizer builds.

    The quantizer is built once here, so a bad argument (``ch_axis='x'``, an unknown observer,
    an unknown keyword) fails now, named ``quant_cfg.roles.<role>``, not in a calibration hook.
    """
    from .quantizers import QUANTIZERS, build_quantizer
    key = f'quant_cfg.roles.{role}'
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise QuantConfigError(key, 'expected None (keep the tensor float) or '
                                    f'dict(type=<quantizer>, ...), got {_describe(cfg)}')
    qtype = cfg.get('type')
    if not isinstance(qtype, str) or qtype not in QUANTIZERS:
        raise QuantConfigError(f'{key}.type', f'expected a registered quantizer, one of '
                                              f'{sorted(QUANTIZERS)}, got {_describe(qtype)}')
    for arg, check in COMMON_ARGS.items():
        if arg in cfg:
            check(f'{key}.{arg}', cfg[arg])
    frozen = freeze(cfg, key)
    try:
        build_quantizer(thaw(frozen))
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        reason = err.args[0] if isinstance(err, KeyError) and err.args else err  # no KeyError quotes
        raise QuantConfigError(key, f'{qtype} cannot be built from {thaw(frozen)}: {reason}') from err
    return frozen


def quantizer_class(cfg: Optional[Mapping]):
    from .quantizers import QUANTIZERS
    return None if cfg is None else QUANTIZERS[cfg['type']]


def is_per_channel_uniform(cfg: Optional[Mapping]) -> bool:
    from .quantizers import UniformQuantizer
    cls = quantizer_class(cfg)
    return cls is not None and issubclass(cls, UniformQuantizer) and cfg.get('ch_axis') is not None


def _per_tensor_unsigned_uniform(cfg: Optional[Mapping]) -> bool:
    from .quantizers import UniformQuantizer
    if quantizer_class(cfg) is not UniformQuantizer or cfg.get('ch_axis') is not None:
        return False
    signed = cfg.get('signed')
    return not (cfg.get('symmetric', False) if signed is None else signed)


def integer_layernorm_problem(roles: Mapping[str, Any]) -> Optional[str]:
    """Why FQ-ViT's integer LayerNorm cannot run with these roles (None when it can).

    It reads integer codes of its input, the ``residual`` stream's quantizer where the roles have
    one, else ``ln_input``: Power-of-Two-Factor codes (``shifted_codes``) or per-tensor unsigned
    uniform codes; and it requantizes to a per-tensor unsigned uniform grid on ``ln_output``.
    """
    source = 'residual' if roles.get('residual') is not None else 'ln_input'
    in_cfg = roles.get(source)
    in_cls = quantizer_class(in_cfg)
    if in_cls is None or not (hasattr(in_cls, 'shifted_codes') or _per_tensor_unsigned_uniform(in_cfg)):
        return ('needs integer codes of the norm input: a PTFQuantizer or a per-tensor unsigned '
                f'UniformQuantizer on {source}, got {None if in_cfg is None else thaw(in_cfg)}')
    out = roles.get('ln_output')
    if not _per_tensor_unsigned_uniform(out):
        return ('needs a per-tensor unsigned UniformQuantizer on ln_output (ch_axis=None, '
                f'symmetric=False), got {None if out is None else thaw(out)}')
    return None
