"""``quant_cfg.search_cfg``: every key of the layer search, its default and its allowed range.

``resolve_search_cfg`` runs inside ``make_spec``, so a bad setting fails when the config is read,
before any model work, for every method. The resolved dict (every key, defaults filled in) is what
``QuantSpec.search_cfg`` holds and what the state file records.
"""
import numbers

# key: (default, description). ``metric``'s default depends on the search (see ``METRIC_DEFAULTS``).
SEARCH_KEYS = {
    'metric': (None, "layer objective: 'hessian' (PTQ4ViT: −mean((g ⊙ (O − Ô))²), g = ∂L/∂O from "
                     "pseudo-label gradients; needs classification logits) or 'mse' (−mean((O − Ô)²))"),
    'images': (32, 'calibration images captured for the search (int >= 1)'),
    'max_rows': (2048, 'input rows kept per Linear / Conv (int >= 1)'),
    'rounds': (3, 'alternating rounds (weight, input / q, k, probs, v) (int >= 1)'),
    'attn_images': (4, 'images whose attention operands are captured (int >= 0; 0 = attention '
                       'quantizers are not searched)'),
    'attn_rows': (256, 'queries kept per attention call (int >= 1)'),
    'grad_batch': (8, "images per backward pass for the 'hessian' metric (int >= 1)"),
    'alpha_min': (0.01, 'smallest range multiplier of uniform candidates (0 < alpha_min < alpha_max)'),
    'alpha_max': (1.2, 'largest range multiplier of uniform candidates'),
    'grid_n': (100, "PTQ4ViT grid: grid_n + 1 multipliers in [alpha_min, alpha_max] (int >= 1)"),
    'eq_n': (128, 'FPCS: coarse grid size and evaluations per level (int >= top_k)'),
    'top_k': (16, 'FPCS: survivors per level (int >= 1)'),
    'levels': (6, 'FPCS: levels, the coarse grid included (int >= 1)'),
    'fpcs_tol': (1e-3, 'FPCS stops once a level improves the best score by <= this fraction '
                       '(number >= 0)'),
    'screen_rows': (256, 'candidates are screened on this many rows, the confirm best re-scored '
                         'on all rows (int >= 0; 0 = no screening)'),
    'confirm': (4, 'screened candidates re-scored on all rows (int >= 1)'),
    'attn_qk': ('logits', "q / k screened on the logits error ('logits') or on the attention "
                          "output error ('output')"),
    'chunk_elems': (1 << 24, 'elements per intermediate when scoring candidates in batches (int >= 1)'),
    'seed': (0, 'row / query subsampling seed (int >= 0)'),
}
METRICS = ('hessian', 'mse')
METRIC_DEFAULTS = {'hessian': 'hessian', 'fpcs': 'mse'}   # PTQ4ViT's and AdaLog's objectives
SEARCH_DEFAULTS = {k: v for k, (v, _) in SEARCH_KEYS.items()}

_INTS = {'images': 1, 'max_rows': 1, 'rounds': 1, 'attn_images': 0, 'attn_rows': 1, 'grad_batch': 1,
         'grid_n': 1, 'eq_n': 1, 'top_k': 1, 'levels': 1, 'screen_rows': 0, 'confirm': 1,
         'chunk_elems': 1, 'seed': 0}


def _err(key, expected, value):
    return ValueError(f'quant_cfg.search_cfg.{key} must be {expected}, got {value!r}')


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def resolve_search_cfg(method: str, search, search_cfg) -> dict:
    """Every search setting with defaults filled in, checked; ``{}`` for a method without search.

    Args:
        method: ``quant_cfg.method`` (for messages).
        search: ``quant_cfg.search`` (None, 'hessian' = PTQ4ViT grid, 'fpcs' = AdaLog FPCS).
        search_cfg: the user's ``quant_cfg.search_cfg`` (a dict or None).

    Raises ``ValueError`` naming ``quant_cfg.search_cfg.<key>`` and what was expected.
    """
    if search_cfg is None:
        search_cfg = {}
    if not isinstance(search_cfg, dict):
        raise ValueError(f'quant_cfg.search_cfg must be a dict of search settings (keys: '
                         f'{", ".join(SEARCH_KEYS)}), got {search_cfg!r}')
    for key in search_cfg:
        if key not in SEARCH_KEYS:
            raise ValueError(f'quant_cfg.search_cfg.{key}: unknown key; expected one of '
                             f'{sorted(SEARCH_KEYS)}')
    cfg = dict(SEARCH_DEFAULTS)
    cfg['metric'] = METRIC_DEFAULTS.get(search, 'mse')
    cfg.update(search_cfg)
    for key, lo in _INTS.items():
        if not _is_int(cfg[key]) or cfg[key] < lo:
            raise _err(key, f'an int >= {lo}', cfg[key])
        cfg[key] = int(cfg[key])
    for key in ('alpha_min', 'alpha_max', 'fpcs_tol'):
        if not _is_number(cfg[key]):
            raise _err(key, 'a number', cfg[key])
        cfg[key] = float(cfg[key])
    if not 0 < cfg['alpha_min'] < cfg['alpha_max']:
        raise ValueError('quant_cfg.search_cfg.alpha_min / alpha_max: need 0 < alpha_min < '
                         f'alpha_max, got {cfg["alpha_min"]!r}, {cfg["alpha_max"]!r}')
    if cfg['fpcs_tol'] < 0:
        raise _err('fpcs_tol', 'a number >= 0', cfg['fpcs_tol'])
    if cfg['top_k'] > cfg['eq_n']:
        raise ValueError(f'quant_cfg.search_cfg.top_k must be <= eq_n (every FPCS survivor gets '
                         f'eq_n // top_k refinements), got top_k={cfg["top_k"]}, eq_n={cfg["eq_n"]}')
    if cfg['metric'] not in METRICS:
        raise _err('metric', f'one of {METRICS}', cfg['metric'])
    if cfg['attn_qk'] not in ('logits', 'output'):
        raise _err('attn_qk', "'logits' or 'output'", cfg['attn_qk'])
    if search is None:
        if search_cfg:
            raise ValueError(f'quant_cfg.search_cfg is set ({sorted(search_cfg)}) but method '
                             f'{method!r} runs no layer search (quant_cfg.search is None): remove '
                             "search_cfg, or set quant_cfg.search='hessian' or 'fpcs'")
        return {}
    return cfg
