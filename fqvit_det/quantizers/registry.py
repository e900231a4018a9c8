"""A plain-Python registry for quantizers and observers.

The core stays free of mmengine; ``fqvit_det.mm.registry`` mirrors these entries into mmengine
registries so that configs can name them with ``type=...``.
"""
from typing import Callable, Dict, Type

QUANTIZERS: Dict[str, Type] = {}
OBSERVERS: Dict[str, Type] = {}


def _register(table: Dict[str, Type], kind: str, name: str = None) -> Callable[[Type], Type]:
    def decorator(cls: Type) -> Type:
        key = name or cls.__name__
        if key in table and table[key] is not cls:
            raise KeyError(f'{kind} {key!r} is already registered to {table[key]!r}')
        table[key] = cls
        return cls
    return decorator


def register_quantizer(name: str = None):
    return _register(QUANTIZERS, 'quantizer', name)


def register_observer(name: str = None):
    return _register(OBSERVERS, 'observer', name)


def _build(table: Dict[str, Type], kind: str, cfg, **defaults):
    if isinstance(cfg, str):
        cfg = dict(type=cfg)
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f'{kind} config must be a dict with a "type" key, got {cfg!r}')
    cfg = dict(cfg)
    name = cfg.pop('type')
    if name not in table:
        raise KeyError(f'unknown {kind} type {name!r}; expected one of {sorted(table)}')
    kwargs = {**defaults, **cfg}
    try:
        return table[name](**kwargs)
    except TypeError as err:
        raise TypeError(f'{kind} {name!r}: invalid arguments {sorted(kwargs)}: {err}') from err


def build_quantizer(cfg, **defaults):
    """Build a quantizer from ``dict(type='UniformQuantizer', bits=8, ...)`` (or a bare type name)."""
    return _build(QUANTIZERS, 'quantizer', cfg, **defaults)


def build_observer(cfg, **defaults):
    return _build(OBSERVERS, 'observer', cfg, **defaults)
