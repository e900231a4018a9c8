"""quant_cfg.search_cfg is resolved and checked by make_spec, for every method, before model work."""
import pytest

from fqvit_det.presets import make_spec
from fqvit_det.search.config import SEARCH_DEFAULTS, SEARCH_KEYS, resolve_search_cfg

BAD = [
    ('fqvit', dict(eq_n=-1), r'search_cfg\.eq_n must be an int >= 1, got -1'),
    ('adalog', dict(eq_n=-1), r'search_cfg\.eq_n must be an int >= 1'),
    ('ptq4vit', 'fast', r"quant_cfg\.search_cfg: expected a dict or None, got 'fast'"),
    ('repq', ['eq_n'], r'quant_cfg\.search_cfg: expected a dict'),
    ('adalog', dict(bogus=1), r'search_cfg\.bogus: unknown key; expected one of'),
    ('adalog', dict(max_rows=0), r'search_cfg\.max_rows must be an int >= 1'),
    ('ptq4vit', dict(images=True), r'search_cfg\.images must be an int >= 1, got True'),
    ('ptq4vit', dict(images=2.0), r'search_cfg\.images must be an int'),
    ('ptq4vit', dict(screen_rows=-1), r'search_cfg\.screen_rows must be an int >= 0'),
    ('ptq4vit', dict(attn_images=None), r'search_cfg\.attn_images must be an int >= 0'),
    ('ptq4vit', dict(alpha_min=1.5), r'search_cfg\.alpha_min / alpha_max: need 0 < alpha_min'),
    ('ptq4vit', dict(alpha_min=0), r'search_cfg\.alpha_min / alpha_max'),
    ('ptq4vit', dict(alpha_max='1'), r'search_cfg\.alpha_max must be a number'),
    ('adalog', dict(fpcs_tol=-1e-3), r'search_cfg\.fpcs_tol must be a number >= 0'),
    ('adalog', dict(fpcs_tol=False), r'search_cfg\.fpcs_tol must be a number'),
    ('adalog', dict(top_k=64, eq_n=32), r'search_cfg\.top_k must be <= eq_n'),
    ('ptq4vit', dict(metric='kl'), r"search_cfg\.metric must be one of \('hessian', 'mse'\)"),
    ('adalog', dict(attn_qk='both'), r"search_cfg\.attn_qk must be 'logits' or 'output'"),
    ('adalog', dict(seed=-1), r'search_cfg\.seed must be an int >= 0'),
    ('repq', dict(images=8), r"quant_cfg\.search_cfg is set \(\['images'\]\) but method 'repq' runs no"),
    ('fqvit', dict(metric='mse'), r"method 'fqvit' runs no layer search"),
]


@pytest.mark.parametrize('method,search_cfg,message', BAD)
def test_bad_search_cfg_fails_in_make_spec(method, search_cfg, message):
    with pytest.raises(ValueError, match=message):
        make_spec(method, 8, 8, search_cfg=search_cfg)


def test_defaults_and_metric_per_method():
    ptq = make_spec('ptq4vit', 6, 6).search_cfg
    ada = make_spec('adalog', 4, 4).search_cfg
    assert set(ptq) == set(ada) == set(SEARCH_KEYS)
    assert ptq['metric'] == 'hessian' and ada['metric'] == 'mse'      # as in the papers
    assert {k: v for k, v in ptq.items() if k != 'metric'} == \
        {k: v for k, v in SEARCH_DEFAULTS.items() if k != 'metric'}
    assert make_spec('fqvit').search_cfg == {} and make_spec('repq', 4, 4).search_cfg == {}
    assert make_spec('ptq4vit', 6, 6, search_cfg=dict(metric='mse')).search_cfg['metric'] == 'mse'
    assert make_spec('adalog', 4, 4, search_cfg=dict(metric='hessian')).search_cfg['metric'] == 'hessian'
    # a search switched on for another method gets that search's defaults
    assert make_spec('repq', 4, 4, search='fpcs').search_cfg['metric'] == 'mse'
    assert make_spec('adalog', 4, 4, search_cfg=None).search_cfg == ada


def test_resolved_cfg_is_a_fixed_point():
    cfg = resolve_search_cfg('ptq4vit', 'hessian', dict(eq_n=32, top_k=8, fpcs_tol=0))
    assert cfg['fpcs_tol'] == 0.0 and isinstance(cfg['fpcs_tol'], float)
    assert resolve_search_cfg('ptq4vit', 'hessian', cfg) == cfg


def test_hessian_metric_on_a_detector_fails_at_config_time():
    from fqvit_det.mm.quant_model import split_quant_cfg
    with pytest.raises(ValueError, match=r"quant_cfg\.search_cfg\.metric: 'hessian'.*set quant_cfg\.search_cfg\.metric='mse'"):
        split_quant_cfg(dict(method='ptq4vit', w_bits=6, a_bits=6, scope='full'), outputs_logits=False)
    spec, glue = split_quant_cfg(dict(method='ptq4vit', w_bits=6, a_bits=6, scope='full',
                                      search_cfg=dict(metric='mse')), outputs_logits=False)
    assert spec.search_cfg['metric'] == 'mse' and glue == dict(scope='full')
    assert split_quant_cfg(dict(method='ptq4vit'))[0].search_cfg['metric'] == 'hessian'
