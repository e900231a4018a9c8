import pytest

from fqvit_det.presets import METHODS, ROLES, make_spec


@pytest.mark.parametrize('method', METHODS)
def test_every_method_resolves_every_role(method):
    spec = make_spec(method, 6, 6)
    assert set(spec.roles) == set(ROLES)
    assert spec.method == method


def test_fqvit_paper_placement():
    spec = make_spec('fqvit', 8, 8, 4)
    assert spec.roles['ln_input']['type'] == 'PTFQuantizer'
    assert spec.roles['attn_probs'] == dict(type='LogIntSoftmax', bits=4)
    assert spec.roles['weight']['symmetric'] and spec.roles['weight']['ch_axis'] == 0
    assert spec.integer_layernorm and spec.search is None


def test_method_specific_roles():
    assert make_spec('ptq4vit', 6, 6).roles['attn_probs']['type'] == 'TwinUniformSoftmaxQuantizer'
    assert make_spec('ptq4vit', 6, 6).roles['fc2_input']['type'] == 'TwinUniformGeluQuantizer'
    repq = make_spec('repq', 4, 4)
    assert repq.reparam and repq.roles['attn_probs']['type'] == 'LogSqrt2Quantizer'
    assert repq.roles['patch_embed_input']['bits'] == 8
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
    with pytest.raises((ValueError, TypeError)) as err:
        make_spec(**kwargs)
    assert key in str(err.value)
