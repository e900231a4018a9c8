import pytest

from fqvit_det.presets import FQVIT_ONLY_ROLES, METHODS, ROLES, make_spec


@pytest.mark.parametrize('method', METHODS)
def test_every_method_resolves_every_role(method):
    spec = make_spec(method, 6, 6)
    assert set(spec.roles) == set(ROLES)
    assert spec.method == method


def test_fqvit_paper_placement():
    spec = make_spec('fqvit', 8, 8, 4)
    r = spec.roles
    # The residual stream is PTF-quantized where it is formed; norms read it (no ln_input).
    assert r['residual']['type'] == 'PTFQuantizer' and r['ln_input'] is None
    assert r['attn_probs'] == dict(type='LogIntSoftmax', bits=4, logit_observer=dict(type='MinMaxObserver'),
                                   include_zero=False)
    # Official range conventions: weights max|w| / 127.5, activation ranges as observed.
    assert r['weight']['symmetric'] and r['weight']['ch_axis'] == 0
    assert r['weight']['symmetric_divisor'] == 'half_range'
    assert r['residual']['include_zero'] is False
    assert spec.integer_layernorm and spec.search is None
    # qkv output as one tensor: no separate q / k / v scales.
    assert r['qkv_output']['type'] == 'UniformQuantizer' and r['q'] is r['k'] is r['v'] is None
    for role in ('patch_embed_output', 'embed_tokens', 'pos_embed', 'attn_output', 'mlp_output',
                 'attn_scores', 'final_ln_output', 'head_input', 'head_output', 'rel_pos_bias'):
        assert r[role] == dict(type='UniformQuantizer', bits=8, symmetric=False, ch_axis=None,
                               observer=dict(type='MinMaxObserver'), include_zero=False), role


def test_fqvit_switches_follow_official_config():
    no_ptf = make_spec('fqvit', 8, 8, 8, ptf=False, lis=False, observer='omse').roles
    act = dict(type='UniformQuantizer', bits=8, symmetric=False, ch_axis=None,
               observer=dict(type='OMSEObserver'), include_zero=False)
    assert no_ptf['residual'] == act  # *_A_LN falls back to the activation config
    assert no_ptf['attn_probs'] == act
    lis = make_spec('fqvit', 8, 8, 4, observer='ema').roles['attn_probs']
    assert lis['logit_observer'] == dict(type='EMAObserver')  # qact_attn1 uses the chosen observer


@pytest.mark.parametrize('method', ['ptq4vit', 'repq', 'adalog'])
def test_other_methods_keep_fqvit_only_tensors_float(method):
    roles = make_spec(method, 6, 6).roles
    assert all(roles[r] is None for r in FQVIT_ONLY_ROLES)
    assert roles['ln_input'] is None


def test_method_specific_roles():
    assert make_spec('ptq4vit', 6, 6).roles['attn_probs']['type'] == 'TwinUniformSoftmaxQuantizer'
    assert make_spec('ptq4vit', 6, 6).roles['fc2_input']['type'] == 'TwinUniformGeluQuantizer'
    repq = make_spec('repq', 4, 4)
    assert repq.reparam and repq.roles['attn_probs']['type'] == 'LogSqrt2Quantizer'
    assert repq.roles['patch_embed_input']['bits'] == 8
    for role in ('weight', 'ln_output', 'proj_input', 'patch_embed_input'):  # RepQ-ViT's ranges
        assert repq.roles[role]['include_zero'] is False and repq.roles[role]['clamp_zero_point'] is False
    adalog = make_spec('adalog', 4, 4)
    assert adalog.search == 'fpcs' and adalog.roles['q']['ch_axis'] == 1
    assert adalog.roles['fc2_input']['shift'] > 0.16


def test_mixed_preset_from_config_only():
    spec = make_spec('repq', 4, 4, roles=dict(attn_probs=dict(type='AdaLogQuantizer', bits=4),
                                              ln_input=None), search=None)
    assert spec.roles['attn_probs']['type'] == 'AdaLogQuantizer'
    q = spec.build('attn_probs', 'x.attn_probs')
    assert type(q).__name__ == 'AdaLogQuantizer' and q.qname == 'x.attn_probs'


@pytest.mark.parametrize('kwargs, key', [
    (dict(method='nope'), 'quant_cfg.method'),
    (dict(w_bits=9), 'quant_cfg.w_bits'),
    (dict(a_bits=1), 'quant_cfg.a_bits'),
    (dict(attn_bits='4'), 'quant_cfg.attn_bits'),
    (dict(observer='median'), 'quant_cfg.observer'),
    (dict(roles=dict(qq=None)), 'quant_cfg.roles.qq'),
    (dict(roles=dict(q=dict(type='Nope'))), 'quant_cfg.roles.q'),
    (dict(roles=dict(q=dict(type='UniformQuantizer', bits=1))), 'quant_cfg.roles.q.bits'),
    (dict(roles=dict(q=dict(type='UniformQuantizer', bogus=1))), 'quant_cfg.roles.q'),
    (dict(calib_images=0), 'quant_cfg.calib_images'),
    (dict(search='grid'), 'quant_cfg.search'),
    (dict(colour='red'), 'quant_cfg.colour'),
])
def test_bad_values_name_the_key(kwargs, key):
    from fqvit_det.validation import QuantConfigError
    with pytest.raises(QuantConfigError) as err:
        make_spec(**kwargs)
    assert err.value.key.startswith(key) and str(err.value).startswith(key)
