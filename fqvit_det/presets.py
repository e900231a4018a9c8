"""The four methods as role tables (reference §1.6), plus validation of user overrides.

A preset maps every tensor role to a quantizer config (``None`` keeps the tensor float) and names
the calibration procedure. Users override any role from a config without code::

    quant_cfg = dict(method='repq', w_bits=4, a_bits=4,
                     roles=dict(attn_probs=dict(type='AdaLogQuantizer', bits=4)))
"""
import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .quantizers import QUANTIZERS, build_quantizer

ROLES = {
    'weight': 'weights of the transformer Linears (qkv, proj, fc1, fc2, patch-merging reduction)',
    'patch_embed_weight': 'patch-embedding convolution weight',
    'head_weight': 'classifier head weight',
    'patch_embed_input': 'input image entering the patch embedding',
    'ln_input': 'LayerNorm input (the residual stream)',
    'ln_output': 'LayerNorm output = qkv / fc1 / reduction input',
    'q': 'queries (QKᵀ operand)', 'k': 'keys (QKᵀ operand)', 'v': 'values (P·V operand)',
    'attn_logits': 'attention logits before softmax',
    'attn_probs': 'attention probabilities (P·V operand)',
    'proj_input': 'attention output projection input',
    'fc2_input': 'post-GELU activation (fc2 input)',
    'head_input': 'classifier head input',
    'rel_pos_bias': 'Swin relative-position bias added to the logits',
    'attn_mask': 'Swin shifted-window mask added to the logits',
    'det_weight': 'weights of neck / RPN / RoI-head convolutions and Linears',
    'det_input': 'inputs of neck / RPN / RoI-head convolutions and Linears',
    'det_dw_input': 'inputs of depthwise convolutions in CNN backbones, necks and heads (default: the '
                    'det_input quantizer; per-channel scales stay integer-exact there)',
}
METHODS = ('fqvit', 'ptq4vit', 'repq', 'adalog')
SEARCHES = (None, 'hessian', 'fpcs')
FQVIT_OBSERVERS = {'minmax': 'MinMaxObserver', 'ema': 'EMAObserver',
                   'percentile': 'PercentileObserver', 'omse': 'OMSEObserver'}
GELU_MIN = 0.16997124  # |min GELU|: PTQ4ViT's negative twin range and AdaLog's shift η


def _u(bits, symmetric=False, ch_axis=None, observer='MinMaxObserver', **kw):
    return dict(type='UniformQuantizer', bits=bits, symmetric=symmetric, ch_axis=ch_axis,
                observer=dict(type=observer), **kw)


def fqvit_roles(w, a, attn, observer='minmax', ptf=True, lis=True):
    obs = FQVIT_OBSERVERS[observer]
    w_cfg = _u(w, symmetric=True, ch_axis=0)
    act = _u(a, observer=obs)
    return dict(
        weight=w_cfg, patch_embed_weight=w_cfg, head_weight=w_cfg, det_weight=w_cfg,
        patch_embed_input=act, det_input=act,
        ln_input=dict(type='PTFQuantizer', bits=a, observer=dict(type='MinMaxObserver')) if ptf else act,
        ln_output=act, q=act, k=act, v=act, attn_logits=act,
        attn_probs=(dict(type='LogIntSoftmax', bits=attn) if lis
                    else _u(attn, observer=obs)),
        proj_input=act, fc2_input=act, head_input=act,
        rel_pos_bias=_u(8, observer=obs), attn_mask=None,
    )


def ptq4vit_roles(w, a, attn):
    w_cfg = _u(w, symmetric=True)
    act = _u(a, symmetric=True)
    return dict(
        weight=w_cfg, head_weight=w_cfg, det_weight=w_cfg,
        patch_embed_weight=_u(w, symmetric=True, ch_axis=0),
        patch_embed_input=None, det_input=act, ln_input=None, ln_output=act,
        q=act, k=act, v=act, attn_logits=None,
        attn_probs=dict(type='TwinUniformSoftmaxQuantizer', bits=attn),
        proj_input=act, fc2_input=dict(type='TwinUniformGeluQuantizer', bits=a),
        head_input=act, rel_pos_bias=None, attn_mask=None,
    )


def repq_roles(w, a, attn):
    pct = 'PercentileSearchObserver'
    w_cfg = _u(w, ch_axis=0, observer=pct)
    act = _u(a, observer=pct)
    return dict(
        weight=w_cfg, patch_embed_weight=w_cfg, head_weight=w_cfg, det_weight=w_cfg,
        patch_embed_input=_u(8, observer=pct), det_input=act,
        ln_input=None, ln_output=_u(a, ch_axis=-1, observer=pct),
        q=act, k=act, v=act, attn_logits=None,
        attn_probs=dict(type='LogSqrt2Quantizer', bits=attn),
        proj_input=act, fc2_input=act, head_input=act, rel_pos_bias=None, attn_mask=None,
    )


def adalog_roles(w, a, attn):
    pct = 'PercentileSearchObserver'
    w_cfg = _u(w, ch_axis=0, observer=pct)
    act = _u(a, observer=pct)
    head = _u(a, ch_axis=1, observer=pct)  # (B, heads, N, d): per-head
    return dict(
        weight=w_cfg, patch_embed_weight=w_cfg, head_weight=w_cfg, det_weight=w_cfg,
        patch_embed_input=_u(8, observer=pct), det_input=act,
        ln_input=None, ln_output=_u(a, ch_axis=-1, observer=pct),
        q=head, k=head, v=head, attn_logits=None,
        attn_probs=dict(type='AdaLogQuantizer', bits=attn),
        proj_input=act, fc2_input=dict(type='AdaLogQuantizer', bits=a, shift=GELU_MIN),
        head_input=act, rel_pos_bias=None, attn_mask=None,
    )


METHOD_DEFAULTS = {
    'fqvit': dict(search=None, reparam=False, integer_layernorm=True, calib_images=1000),
    'ptq4vit': dict(search='hessian', reparam=False, integer_layernorm=False, calib_images=32),
    'repq': dict(search=None, reparam=True, integer_layernorm=False, calib_images=32),
    'adalog': dict(search='fpcs', reparam=True, integer_layernorm=False, calib_images=32),
}


@dataclass
class QuantSpec:
    """A validated, fully resolved quantization recipe."""
    method: str
    w_bits: int
    a_bits: int
    attn_bits: int
    roles: Dict[str, Optional[dict]]
    search: Optional[str] = None
    reparam: bool = False
    integer_layernorm: bool = False
    calib_images: int = 32
    search_cfg: Dict[str, Any] = field(default_factory=dict)

    def build(self, role: str, name: str):
        cfg = self.roles.get(role)
        if cfg is None:
            return None
        q = build_quantizer(copy.deepcopy(cfg))
        q.qname = name
        return q


def _check_bits(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
        raise ValueError(f'quant_cfg.{key} must be an integer bit-width in 2..8, got {value!r}')


def make_spec(method: str = 'fqvit', w_bits: int = 8, a_bits: int = 8, attn_bits: int = None,
              observer: str = 'minmax', ptf: bool = True, lis: bool = True,
              roles: Dict[str, Any] = None, **options) -> QuantSpec:
    """Resolve a preset and overrides into a ``QuantSpec``, naming the offending key on bad input."""
    if method not in METHODS:
        raise ValueError(f'quant_cfg.method must be one of {METHODS}, got {method!r}')
    _check_bits('w_bits', w_bits)
    _check_bits('a_bits', a_bits)
    attn_bits = a_bits if attn_bits is None else attn_bits
    _check_bits('attn_bits', attn_bits)
    if method == 'fqvit':
        if observer not in FQVIT_OBSERVERS:
            raise ValueError(f'quant_cfg.observer must be one of {sorted(FQVIT_OBSERVERS)}, got {observer!r}')
        table = fqvit_roles(w_bits, a_bits, attn_bits, observer, ptf, lis)
    else:
        table = {'ptq4vit': ptq4vit_roles, 'repq': repq_roles, 'adalog': adalog_roles}[method](
            w_bits, a_bits, attn_bits)
    for role, cfg in (roles or {}).items():
        if role not in ROLES:
            raise ValueError(f'quant_cfg.roles.{role}: unknown tensor role; expected one of {sorted(ROLES)}')
        if cfg is not None:
            if not isinstance(cfg, dict) or cfg.get('type') not in QUANTIZERS:
                raise ValueError(f'quant_cfg.roles.{role}: expected None or dict(type=<quantizer>, ...) '
                                 f'with type in {sorted(QUANTIZERS)}, got {cfg!r}')
            cfg = dict(cfg)
            bits = cfg.get('bits', 8)
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise ValueError(f'quant_cfg.roles.{role}.bits must be an int in 2..16, got {bits!r}')
            try:
                build_quantizer(copy.deepcopy(cfg))
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f'quant_cfg.roles.{role}: {err}') from err
        table[role] = cfg
    if 'det_dw_input' not in (roles or {}):
        table['det_dw_input'] = copy.deepcopy(table.get('det_input'))
    resolved = dict(METHOD_DEFAULTS[method])
    search_cfg = options.pop('search_cfg', {}) or {}
    for key, value in options.items():
        if key not in resolved:
            raise ValueError(f'quant_cfg.{key}: unknown option; expected one of '
                             f'{sorted(set(resolved) | {"method", "w_bits", "a_bits", "attn_bits", "observer", "ptf", "lis", "roles", "search_cfg"})}')
        resolved[key] = value
    if resolved['search'] not in SEARCHES:
        raise ValueError(f'quant_cfg.search must be one of {SEARCHES}, got {resolved["search"]!r}')
    if not isinstance(resolved['calib_images'], int) or resolved['calib_images'] < 1:
        raise ValueError(f'quant_cfg.calib_images must be a positive int, got {resolved["calib_images"]!r}')
    return QuantSpec(method=method, w_bits=w_bits, a_bits=a_bits, attn_bits=attn_bits, roles=table,
                     search_cfg=dict(search_cfg), **resolved)
