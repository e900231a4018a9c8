"""The four methods as role tables (reference §1.6), plus validation of user overrides.

A preset maps every tensor role to a quantizer config (``None`` keeps the tensor float) and names
the calibration procedure. Users override any role from a config without code::

    quant_cfg = dict(method='repq', w_bits=4, a_bits=4,
                     roles=dict(attn_probs=dict(type='AdaLogQuantizer', bits=4)))
"""
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

from .quantizers import build_quantizer
from .search.config import resolve_search_cfg
from .validation import (FrozenDict, QuantConfigError, check_role_cfg, expect_bool, expect_choice,
                         expect_dict, expect_int, freeze, integer_layernorm_problem,
                         is_per_channel_uniform, thaw)

ROLES = {
    'weight': 'weights of the transformer Linears (qkv, proj, fc1, fc2, patch-merging reduction)',
    'patch_embed_weight': 'patch-embedding convolution weight',
    'head_weight': 'classifier head weight',
    'patch_embed_input': 'input image entering the patch embedding',
    'patch_embed_output': 'patch-embedding convolution output (Swin: the patch norm input)',
    'embed_tokens': 'ViT: class + patch tokens before the position embedding is added; '
                    'Swin: the patch-norm output, the first residual-stream tensor',
    'pos_embed': 'ViT position embedding (the table added to the tokens)',
    'residual': 'the residual stream itself, quantized where it is formed: the embedding after '
                'the position embedding (ViT), every block sum x + attn(..) and x + mlp(..), the '
                'patch-merging output (Swin). The quantized sum is both the next residual operand '
                'and the next LayerNorm input (the norm reads these codes; it does not quantize again)',
    'ln_input': "a LayerNorm's own input quantizer (only the norm sees it; the residual path stays "
                "float). For mixes; a norm fed by a 'residual' quantizer must not have one",
    'ln_output': 'LayerNorm output = qkv / fc1 / reduction input',
    'qkv_output': 'qkv projection output: q, k and v as one tensor with one scale',
    'q': 'queries (QKᵀ operand)', 'k': 'keys (QKᵀ operand)', 'v': 'values (P·V operand)',
    'attn_scores': 'QKᵀ·scale before the relative-position bias is added (Swin only; without a '
                   'bias the scores are the logits)',
    'attn_logits': 'attention logits before softmax (after the bias, before the window mask)',
    'attn_probs': 'attention probabilities (P·V operand)',
    'proj_input': 'attention P·V output = output projection input',
    'attn_output': 'attention output projection output (before the residual add)',
    'fc2_input': 'post-GELU activation (fc2 input)',
    'mlp_output': 'MLP fc2 output (before the residual add)',
    'final_ln_output': 'Swin final LayerNorm output, before global pooling',
    'head_input': 'classifier head input',
    'head_output': 'classifier logits',
    'rel_pos_bias': 'Swin relative-position bias added to the logits',
    'attn_mask': 'Swin shifted-window mask added to the logits',
    'det_weight': 'weights of neck / RPN / RoI-head convolutions and Linears',
    'det_input': 'inputs of neck / RPN / RoI-head convolutions and Linears',
    'det_dw_input': 'inputs of depthwise convolutions in CNN backbones, necks and heads (default: the '
                    'det_input quantizer; per-channel scales stay integer-exact there)',
}
# Roles only FQ-ViT quantizes (official vit_quant.py / swin_quant.py); the other papers keep
# these tensors float.
FQVIT_ONLY_ROLES = ('patch_embed_output', 'embed_tokens', 'pos_embed', 'residual', 'qkv_output',
                    'attn_scores', 'attn_output', 'mlp_output', 'final_ln_output', 'head_output')
METHODS = ('fqvit', 'ptq4vit', 'repq', 'adalog')
SEARCHES = (None, 'hessian', 'fpcs')
FQVIT_OBSERVERS = {'minmax': 'MinMaxObserver', 'ema': 'EMAObserver',
                   'percentile': 'PercentileObserver', 'omse': 'OMSEObserver'}
GELU_MIN = 0.16997124  # |min GELU|: PTQ4ViT's negative twin range and AdaLog's shift η


def _u(bits, symmetric=False, ch_axis=None, observer='MinMaxObserver', **kw):
    return dict(type='UniformQuantizer', bits=bits, symmetric=symmetric, ch_axis=ch_axis,
                observer=dict(type=observer), **kw)


def _float_fqvit_only(table):
    table.update({role: None for role in FQVIT_ONLY_ROLES})
    return table


def fqvit_roles(w, a, attn, observer='minmax', ptf=True, lis=True):
    """FQ-ViT as its official code places quantizers (``models/vit_quant.py``, ``swin_quant.py``,
    ``layers_quant.py``, ``config.py``): every activation ``QAct`` is A-bit uniform, layer-wise,
    with the chosen observer; the residual stream (``QAct`` with the ``*_LN`` config) is PTF with
    its MinMax-based channel observer when PTF is on, else the plain activation quantizer."""
    obs = FQVIT_OBSERVERS[observer]
    # Official range conventions: Δ_w = max|w| / 127.5 (half the code range), activation ranges
    # as observed (not widened to contain 0) with the zero point clamped to the code range.
    w_cfg = _u(w, symmetric=True, ch_axis=0, symmetric_divisor='half_range')
    act = _u(a, observer=obs, include_zero=False)
    return dict(
        weight=w_cfg, patch_embed_weight=w_cfg, head_weight=w_cfg, det_weight=w_cfg,
        patch_embed_input=act, det_input=act,
        patch_embed_output=act, embed_tokens=act, pos_embed=act,
        residual=(dict(type='PTFQuantizer', bits=a, observer=dict(type='MinMaxObserver'), include_zero=False)
                  if ptf else act),
        ln_input=None, ln_output=act,
        qkv_output=act, q=None, k=None, v=None,
        attn_scores=act, attn_logits=act,  # with LIS, the LogIntSoftmax holds the logit quantizer
        attn_probs=(dict(type='LogIntSoftmax', bits=attn, logit_observer=dict(type=obs), include_zero=False)
                    if lis
                    else _u(attn, observer=obs, include_zero=False)),
        proj_input=act, attn_output=act, fc2_input=act, mlp_output=act,
        final_ln_output=act, head_input=act, head_output=act,
        rel_pos_bias=act, attn_mask=None,
    )


def ptq4vit_roles(w, a, attn):
    w_cfg = _u(w, symmetric=True)
    act = _u(a, symmetric=True)
    return _float_fqvit_only(dict(
        weight=w_cfg, head_weight=w_cfg, det_weight=w_cfg,
        patch_embed_weight=_u(w, symmetric=True, ch_axis=0),
        patch_embed_input=None, det_input=act, ln_input=None, ln_output=act,
        q=act, k=act, v=act, attn_logits=None,
        attn_probs=dict(type='TwinUniformSoftmaxQuantizer', bits=attn),
        proj_input=act, fc2_input=dict(type='TwinUniformGeluQuantizer', bits=a),
        head_input=act, rel_pos_bias=None, attn_mask=None,
    ))


def repq_roles(w, a, attn):
    pct = 'PercentileSearchObserver'
    # Official range conventions: one-sided ranges kept as observed, zero point not clamped.
    official = dict(observer=pct, include_zero=False, clamp_zero_point=False)
    w_cfg = _u(w, ch_axis=0, **official)
    act = _u(a, **official)
    return _float_fqvit_only(dict(
        weight=w_cfg, patch_embed_weight=w_cfg, head_weight=w_cfg, det_weight=w_cfg,
        patch_embed_input=_u(8, **official), det_input=act,
        ln_input=None, ln_output=_u(a, ch_axis=-1, **official),
        q=act, k=act, v=act, attn_logits=None,
        attn_probs=dict(type='LogSqrt2Quantizer', bits=attn),
        proj_input=act, fc2_input=act, head_input=act, rel_pos_bias=None, attn_mask=None,
    ))


def adalog_roles(w, a, attn):
    pct = 'PercentileSearchObserver'
    w_cfg = _u(w, ch_axis=0, observer=pct)
    act = _u(a, observer=pct)
    head = _u(a, ch_axis=1, observer=pct)  # (B, heads, N, d): per-head
    return _float_fqvit_only(dict(
        weight=w_cfg, patch_embed_weight=w_cfg, head_weight=w_cfg, det_weight=w_cfg,
        patch_embed_input=_u(8, observer=pct), det_input=act,
        ln_input=None, ln_output=_u(a, ch_axis=-1, observer=pct),
        q=head, k=head, v=head, attn_logits=None,
        attn_probs=dict(type='AdaLogQuantizer', bits=attn),
        proj_input=act, fc2_input=dict(type='AdaLogQuantizer', bits=a, shift=GELU_MIN),
        head_input=act, rel_pos_bias=None, attn_mask=None,
    ))


METHOD_DEFAULTS = {
    'fqvit': dict(search=None, reparam=False, integer_layernorm=True, calib_images=1000),
    'ptq4vit': dict(search='hessian', reparam=False, integer_layernorm=False, calib_images=32),
    'repq': dict(search=None, reparam=True, integer_layernorm=False, calib_images=32),
    'adalog': dict(search='fpcs', reparam=True, integer_layernorm=False, calib_images=32),
}


OPTION_TYPES = {  # quant_cfg keys that override METHOD_DEFAULTS, and how they are checked
    'search': lambda key, v: expect_choice(key, v, SEARCHES),
    'reparam': expect_bool,
    'integer_layernorm': expect_bool,
    'calib_images': lambda key, v: expect_int(key, v, 1),
    # empirical bias correction on this many calibration images (one batch); 0 = off
    'bias_correction': lambda key, v: expect_int(key, v, 0),
}
FQVIT_ONLY = ('observer', 'ptf', 'lis')
QUANT_CFG_KEYS = ('method', 'w_bits', 'a_bits', 'attn_bits', *FQVIT_ONLY, 'roles', 'search_cfg',
                  *OPTION_TYPES)


@dataclass(frozen=True)
class QuantSpec:
    """A validated, fully resolved quantization recipe; immutable (derive with ``dataclasses.replace``).

    Construction validates every field (types, ranges, every role's quantizer config, method-level
    consistency), so a spec from ``make_spec``, ``from_dict`` or ``replace`` is always valid.
    ``to_dict()`` is the complete recipe as plain JSON (what state files record).
    """
    method: str
    w_bits: int
    a_bits: int
    attn_bits: int
    roles: Mapping[str, Optional[Mapping[str, Any]]]
    search: Optional[str] = None
    reparam: bool = False
    integer_layernorm: bool = False
    calib_images: int = 32
    bias_correction: int = 0
    search_cfg: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        expect_choice('quant_cfg.method', self.method, METHODS)
        for key in ('w_bits', 'a_bits', 'attn_bits'):
            _check_bits(key, getattr(self, key))
        for key, check in OPTION_TYPES.items():
            check(f'quant_cfg.{key}', getattr(self, key))
        roles = expect_dict('quant_cfg.roles', self.roles, allow_none=False)
        missing = sorted(set(ROLES) - set(roles))
        if missing:
            raise QuantConfigError('quant_cfg.roles', f'a resolved recipe needs every role; missing {missing}')
        for role in roles:
            if role not in ROLES:
                raise QuantConfigError(f'quant_cfg.roles.{role}',
                                       f'unknown tensor role; expected one of {sorted(ROLES)}')
        object.__setattr__(self, 'roles', FrozenDict(
            {role: check_role_cfg(role, roles[role]) for role in ROLES}))
        search_cfg = expect_dict('quant_cfg.search_cfg', self.search_cfg)
        object.__setattr__(self, 'search_cfg', freeze(search_cfg or {}, 'quant_cfg.search_cfg'))
        if self.reparam and not is_per_channel_uniform(self.roles['ln_output']):
            raise QuantConfigError(
                'quant_cfg.reparam', 'RepQ-ViT reparameterization folds per-channel LayerNorm-output '
                'scales into the norm and the next Linears, so it needs a per-channel UniformQuantizer '
                f'on ln_output (e.g. ch_axis=-1); got roles.ln_output={_plain(self.roles["ln_output"])}. '
                'Set reparam=False, or give ln_output such a quantizer')
        if self.integer_layernorm:
            problem = integer_layernorm_problem(self.roles)
            if problem:
                raise QuantConfigError('quant_cfg.integer_layernorm',
                                       f'FQ-ViT integer LayerNorm {problem}. Set integer_layernorm=False '
                                       'or change the roles')

    def build(self, role: str, name: str):
        cfg = self.roles.get(role)
        if cfg is None:
            return None
        q = build_quantizer(thaw(cfg))
        q.qname = name
        return q

    def to_dict(self) -> dict:
        """The full resolved recipe as plain JSON-serializable values (``from_dict`` inverts it).

        ``bias_correction`` is left out when off, so recipes (and state files) from before the
        option existed still compare equal."""
        return {f.name: thaw(getattr(self, f.name)) for f in fields(self)
                if not (f.name == 'bias_correction' and not self.bias_correction)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'QuantSpec':
        """A spec from ``to_dict()`` output; validated like any other (unknown keys raise)."""
        data = expect_dict('quant spec', data, allow_none=False)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise QuantConfigError('quant spec', f'unknown keys {unknown}; expected {names}')
        return cls(**data)


def _plain(cfg):
    return None if cfg is None else thaw(cfg)


def _check_bits(key, value):
    expect_int(f'quant_cfg.{key}', value, 2, 8)


def make_spec(method: str = 'fqvit', w_bits: int = 8, a_bits: int = 8, attn_bits: int = None,
              observer: str = None, ptf: bool = None, lis: bool = None,
              roles: Dict[str, Any] = None, **options) -> QuantSpec:
    """Resolve a preset and overrides into a ``QuantSpec``, naming the offending key on bad input.

    ``observer`` / ``ptf`` / ``lis`` choose FQ-ViT's variant (defaults: 'minmax', True, True) and
    are errors for the other methods. ``options`` override ``METHOD_DEFAULTS`` (search, reparam,
    integer_layernorm, calib_images, bias_correction) plus ``search_cfg``.
    """
    unknown = sorted(set(options) - set(QUANT_CFG_KEYS))
    if unknown:
        raise QuantConfigError(f'quant_cfg.{unknown[0]}', f'unknown option; expected one of {sorted(QUANT_CFG_KEYS)}')
    expect_choice('quant_cfg.method', method, METHODS)
    _check_bits('w_bits', w_bits)
    _check_bits('a_bits', a_bits)
    attn_bits = a_bits if attn_bits is None else attn_bits
    _check_bits('attn_bits', attn_bits)
    if method == 'fqvit':
        observer = expect_choice('quant_cfg.observer', 'minmax' if observer is None else observer,
                                 tuple(FQVIT_OBSERVERS))
        ptf = expect_bool('quant_cfg.ptf', True if ptf is None else ptf)
        lis = expect_bool('quant_cfg.lis', True if lis is None else lis)
        table = fqvit_roles(w_bits, a_bits, attn_bits, observer, ptf, lis)
    else:
        for key, value in zip(FQVIT_ONLY, (observer, ptf, lis)):
            if value is not None:
                raise QuantConfigError(f'quant_cfg.{key}', f"applies to method='fqvit' only (got "
                                                           f"method={method!r}); remove it or use roles")
        table = {'ptq4vit': ptq4vit_roles, 'repq': repq_roles, 'adalog': adalog_roles}[method](
            w_bits, a_bits, attn_bits)
    roles = expect_dict('quant_cfg.roles', roles)
    for role, cfg in (roles or {}).items():
        if role not in ROLES:
            raise QuantConfigError(f'quant_cfg.roles.{role}',
                                   f'unknown tensor role; expected one of {sorted(ROLES)}')
        table[role] = check_role_cfg(role, cfg)
    search_cfg = expect_dict('quant_cfg.search_cfg', options.pop('search_cfg', None))
    if 'det_dw_input' not in (roles or {}):
        table['det_dw_input'] = table.get('det_input')
    resolved = dict(METHOD_DEFAULTS[method])
    for key, value in options.items():
        resolved[key] = OPTION_TYPES[key](f'quant_cfg.{key}', value)
    if 'integer_layernorm' not in options and resolved['integer_layernorm']:
        # The method's default, not a request: on only where the roles allow it (e.g. not with a
        # per-channel ln_output override); an explicit True is checked by QuantSpec.
        resolved['integer_layernorm'] = integer_layernorm_problem(table) is None
    search_cfg = resolve_search_cfg(method, resolved['search'], search_cfg)
    return QuantSpec(method=method, w_bits=w_bits, a_bits=a_bits, attn_bits=attn_bits, roles=table,
                     search_cfg=search_cfg, **resolved)
