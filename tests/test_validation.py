"""quant_cfg validation: the frozen QuantSpec, its JSON recipe, and the malformed-config sweep.

The sweep feeds malformed ``quant_cfg`` values through ``tools/test.py``'s ``main`` on a tiny
synthetic config that otherwise runs end to end (``test_control_config_reaches_the_runner``),
and asserts that each fails with the key named, before the runner (model, data) is built.
"""
import copy
import dataclasses
import json
import pickle
import time

import pytest

from fqvit_det.presets import METHODS, ROLES, QuantSpec, make_spec
from fqvit_det.validation import FrozenDict, QuantConfigError

from .tiny_cls import QUANT_CFG, load_tool, make_images, write_config


# --- QuantSpec -----------------------------------------------------------------------------------
@pytest.mark.parametrize('method', METHODS)
def test_to_dict_is_plain_json_and_from_dict_inverts_it(method):
    spec = make_spec(method, 6, 6, 4)
    data = spec.to_dict()
    text = json.dumps(data, sort_keys=True)  # plain JSON: no FrozenDict, tuples or objects left
    assert json.loads(text) == data
    assert set(data['roles']) == set(ROLES)
    assert data['method'] == method and data['attn_bits'] == 4
    back = QuantSpec.from_dict(json.loads(text))
    assert back == spec and back.to_dict() == data


def test_to_dict_holds_the_resolved_override():
    spec = make_spec('repq', 4, 4, roles=dict(ln_output=dict(
        type='UniformQuantizer', bits=4, ch_axis=-1,
        observer=dict(type='PercentileSearchObserver', percentiles=(0.99, 0.999)))))
    ln_out = spec.to_dict()['roles']['ln_output']
    assert ln_out == dict(type='UniformQuantizer', bits=4, ch_axis=-1,
                          observer=dict(type='PercentileSearchObserver', percentiles=[0.99, 0.999]))


def test_spec_is_immutable_and_copies_stay_equal():
    spec = make_spec('fqvit', 8, 8, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.w_bits = 4
    with pytest.raises(TypeError, match='immutable'):
        spec.roles['q'] = None
    with pytest.raises(TypeError, match='immutable'):
        spec.roles['weight']['bits'] = 4
    with pytest.raises(TypeError, match='immutable'):
        spec.search_cfg.update(images=1)
    assert isinstance(spec.roles, FrozenDict)
    assert copy.deepcopy(spec) == spec and pickle.loads(pickle.dumps(spec)) == spec


def test_caller_dicts_are_copied_not_shared():
    override = dict(type='UniformQuantizer', bits=4, observer=dict(type='MinMaxObserver'))
    spec = make_spec('fqvit', 8, 8, 4, roles=dict(q=override))
    override['bits'] = 2
    override['observer']['type'] = 'EMAObserver'
    assert spec.roles['q']['bits'] == 4 and spec.roles['q']['observer']['type'] == 'MinMaxObserver'


def test_replace_and_from_dict_validate_again():
    spec = make_spec('repq', 4, 4)
    assert dataclasses.replace(spec, calib_images=8).calib_images == 8
    with pytest.raises(QuantConfigError, match='quant_cfg.calib_images'):
        dataclasses.replace(spec, calib_images=0)
    data = spec.to_dict()
    data['roles']['ln_output'] = dict(type='UniformQuantizer', bits=4)  # per-tensor: RepQ cannot fold
    with pytest.raises(QuantConfigError, match='quant_cfg.reparam'):
        QuantSpec.from_dict(data)
    data = spec.to_dict()
    del data['roles']['v']
    with pytest.raises(QuantConfigError, match=r"missing \['v'\]"):
        QuantSpec.from_dict(data)
    with pytest.raises(QuantConfigError, match='unknown keys'):
        QuantSpec.from_dict({**spec.to_dict(), 'colour': 'red'})


def test_built_quantizers_do_not_share_or_leak_state():
    spec = make_spec('fqvit', 8, 8, 4)
    a, b = spec.build('qkv_output', 'x.qkv_output'), spec.build('qkv_output', 'y.qkv_output')
    assert a is not b and a.qname == 'x.qkv_output' and b.qname == 'y.qkv_output'
    assert spec.build('attn_mask', 'x.attn_mask') is None


# --- resolution rules ----------------------------------------------------------------------------
def test_fqvit_variant_keys_default_and_are_fqvit_only():
    spec = make_spec('fqvit', 8, 8)
    assert spec.roles['residual']['type'] == 'PTFQuantizer' and spec.integer_layernorm
    assert spec.roles['attn_probs']['type'] == 'LogIntSoftmax'
    assert spec.roles['qkv_output']['observer']['type'] == 'MinMaxObserver'
    ema = make_spec('fqvit', 8, 8, observer='ema', lis=False)
    assert ema.roles['attn_probs']['type'] == 'UniformQuantizer'
    assert ema.roles['qkv_output']['observer']['type'] == 'EMAObserver'
    for key, value in (('observer', 'minmax'), ('ptf', True), ('lis', False)):
        with pytest.raises(QuantConfigError, match=f"quant_cfg.{key}: applies to method='fqvit' only"):
            make_spec('repq', 4, 4, **{key: value})


def test_integer_layernorm_default_follows_the_roles_but_a_request_must_hold():
    per_channel_out = dict(ln_output=dict(type='UniformQuantizer', bits=8, ch_axis=-1))
    assert make_spec('fqvit', 8, 8).integer_layernorm is True
    # FQ-ViT's integer LayerNorm requantizes to a per-tensor grid: with a per-channel ln_output the
    # method's default resolves to off, and the recipe says so ...
    spec = make_spec('fqvit', 8, 8, roles=per_channel_out)
    assert spec.integer_layernorm is False and spec.to_dict()['integer_layernorm'] is False
    # ... while an explicit request that cannot hold is an error with the fix.
    with pytest.raises(QuantConfigError, match='quant_cfg.integer_layernorm: .*per-tensor unsigned '
                                               'UniformQuantizer on ln_output.*integer_layernorm=False'):
        make_spec('fqvit', 8, 8, integer_layernorm=True, roles=per_channel_out)
    with pytest.raises(QuantConfigError, match='quant_cfg.integer_layernorm: .*integer codes of the norm input'):
        make_spec('repq', 4, 4, integer_layernorm=True)  # RepQ keeps the norm input float


def test_reparam_needs_a_per_channel_uniform_ln_output():
    msg = r'quant_cfg.reparam: .*per-channel UniformQuantizer.*Set reparam=False'
    for ln_output in (dict(type='UniformQuantizer', bits=4), None, dict(type='LogSqrt2Quantizer', bits=4)):
        with pytest.raises(QuantConfigError, match=msg):
            make_spec('repq', 4, 4, roles=dict(ln_output=ln_output))
    # The two ways out named in the message both resolve.
    assert not make_spec('repq', 4, 4, reparam=False, roles=dict(ln_output=None)).reparam
    assert make_spec('ptq4vit', 6, 6, reparam=True, roles=dict(
        ln_output=dict(type='UniformQuantizer', bits=6, ch_axis=-1))).reparam


def test_role_override_is_built_once_and_its_error_is_named():
    with pytest.raises(QuantConfigError) as err:
        make_spec('fqvit', roles=dict(ln_input=dict(type='PTFQuantizer', bits=8, num_factors=-1)))
    assert str(err.value).startswith('quant_cfg.roles.ln_input: PTFQuantizer cannot be built')
    assert 'num_factors' in str(err.value)
    assert err.value.key == 'quant_cfg.roles.ln_input'


# --- the malformed-config sweep through tools/test.py ---------------------------------------------
def _set(path, value):
    """QUANT_CFG with ``path`` ('roles.ln_output.ch_axis') set to ``value``; base ``{}`` roles."""
    cfg = copy.deepcopy(QUANT_CFG)
    keys = path.split('.')
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return cfg


def _role(role, **kwargs):
    return _set(f'roles.{role}', kwargs)


MALFORMED = [
    # (case id, quant_cfg, key the message must name)
    ('ptf-no', _set('ptf', 'no'), 'quant_cfg.ptf'),
    ('ptf-string-False', _set('ptf', 'False'), 'quant_cfg.ptf'),
    ('lis-2', _set('lis', 2), 'quant_cfg.lis'),
    ('reparam-yes', _set('reparam', 'yes'), 'quant_cfg.reparam'),
    ('integer_layernorm-1', _set('integer_layernorm', 1), 'quant_cfg.integer_layernorm'),
    ('roles-list', _set('roles', [1, 2]), 'quant_cfg.roles'),
    ('roles-string', _set('roles', 'repq'), 'quant_cfg.roles'),
    ('search_cfg-string', _set('search_cfg', 'fast'), 'quant_cfg.search_cfg'),
    ('search_cfg-list', _set('search_cfg', [1]), 'quant_cfg.search_cfg'),
    ('ln_output-ch_axis-x', _role('ln_output', type='UniformQuantizer', bits=8, ch_axis='x'),
     'quant_cfg.roles.ln_output'),
    ('unknown-role', _set('roles.qq', None), 'quant_cfg.roles.qq'),
    ('unknown-quantizer-type', _role('q', type='NopeQuantizer', bits=8), 'quant_cfg.roles.q'),
    ('quantizer-without-type', _role('q', bits=8), 'quant_cfg.roles.q'),
    ('role-as-string', _set('roles.q', 'UniformQuantizer'), 'quant_cfg.roles.q'),
    ('role-bits-1', _role('q', type='UniformQuantizer', bits=1), 'quant_cfg.roles.q.bits'),
    ('role-bits-True', _role('q', type='UniformQuantizer', bits=True), 'quant_cfg.roles.q.bits'),
    ('role-unknown-argument', _role('q', type='UniformQuantizer', bits=8, bogus=1), 'quant_cfg.roles.q'),
    ('role-unknown-observer', _role('q', type='UniformQuantizer', bits=8, observer=dict(type='Nope')),
     'quant_cfg.roles.q'),
    ('role-symmetric-yes', _role('k', type='UniformQuantizer', bits=8, symmetric='yes'),
     'quant_cfg.roles.k.symmetric'),
    ('role-ptf-num_factors', _role('ln_input', type='PTFQuantizer', bits=8, num_factors=-1),
     'quant_cfg.roles.ln_input'),
    ('w_bits-9', _set('w_bits', 9), 'quant_cfg.w_bits'),
    ('w_bits-0', _set('w_bits', 0), 'quant_cfg.w_bits'),
    ('w_bits-True', _set('w_bits', True), 'quant_cfg.w_bits'),
    ('w_bits-str', _set('w_bits', '8'), 'quant_cfg.w_bits'),
    ('a_bits-float', _set('a_bits', 8.0), 'quant_cfg.a_bits'),
    ('attn_bits-16', _set('attn_bits', 16), 'quant_cfg.attn_bits'),
    ('calib_images-0', _set('calib_images', 0), 'quant_cfg.calib_images'),
    ('calib_images-neg', _set('calib_images', -1), 'quant_cfg.calib_images'),
    ('calib_images-1.5', _set('calib_images', 1.5), 'quant_cfg.calib_images'),
    ('calib_images-True', _set('calib_images', True), 'quant_cfg.calib_images'),
    ('scope-neck', _set('scope', 'neck'), 'quant_cfg.scope'),
    ('observer-max', _set('observer', 'max'), 'quant_cfg.observer'),
    ('method-foo', _set('method', 'foo'), 'quant_cfg.method'),
    ('method-None', _set('method', None), 'quant_cfg.method'),
    ('search-grid', _set('search', 'grid'), 'quant_cfg.search'),
    ('calib_dataloader-3', _set('calib_dataloader', 3), 'quant_cfg.calib_dataloader'),
    ('calib_dataloader-no-dataset', _set('calib_dataloader', dict(batch_size=2)),
     'quant_cfg.calib_dataloader.dataset'),
    ('unknown-key', _set('colour', 'red'), 'quant_cfg.colour'),
    ('ptf-on-repq', dict(method='repq', w_bits=4, a_bits=4, ptf=False), 'quant_cfg.ptf'),
    ('reparam-per-tensor-ln_output', dict(method='repq', w_bits=4, a_bits=4, roles=dict(
        ln_output=dict(type='UniformQuantizer', bits=4))), 'quant_cfg.reparam'),
    ('integer-layernorm-float-norm-input', dict(method='repq', w_bits=4, a_bits=4, integer_layernorm=True),
     'quant_cfg.integer_layernorm'),
]


class RunnerBuilt(Exception):
    """Raised by the patched Runner: validation let the config through to model/data work."""


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return make_images(str(tmp_path_factory.mktemp('tiny_imagenet')))


@pytest.fixture
def test_tool(monkeypatch):
    """tools/test.py's ``main`` with ``Runner.from_cfg`` replaced by a sentinel."""
    from mmengine.runner import Runner

    def no_runner(cfg):
        raise RunnerBuilt(cfg.model.get('quant_cfg'))

    monkeypatch.setattr(Runner, 'from_cfg', staticmethod(no_runner))
    return load_tool('test').main


def test_sweep_has_at_least_30_cases():
    assert len(MALFORMED) >= 30 and len({case for case, _, _ in MALFORMED}) == len(MALFORMED)


def test_control_config_reaches_the_runner(tiny_data, test_tool, tmp_path):
    """Without a malformation the sweep's config passes validation (so each failure is the case's)."""
    cfg = write_config(tmp_path / 'ok.py', tiny_data)
    with pytest.raises(RunnerBuilt):
        test_tool([cfg, '--work-dir', str(tmp_path / 'work')])


@pytest.mark.parametrize('case, quant_cfg, key', MALFORMED, ids=[c for c, _, _ in MALFORMED])
def test_malformed_quant_cfg_fails_before_model_work(case, quant_cfg, key, tiny_data, test_tool,
                                                     tmp_path):
    cfg = write_config(tmp_path / 'bad.py', tiny_data, quant_cfg=quant_cfg)
    t0 = time.time()
    with pytest.raises(QuantConfigError) as err:
        test_tool([cfg, '--work-dir', str(tmp_path / 'work')])
    assert time.time() - t0 < 10
    message = str(err.value)
    assert message.startswith((f'{key}: ', f'{key}.')), message  # the key itself, not a prefix of another


def test_scope_on_a_classifier_fails_before_timm_builds(monkeypatch):
    import timm

    from fqvit_det.mm.cls import QuantizedClassifier

    def no_model(*args, **kwargs):
        raise AssertionError('timm.create_model ran before quant_cfg was validated')

    monkeypatch.setattr(timm, 'create_model', no_model)
    model = dict(type='TimmClassifier', model_name='vit_tiny_patch16_224')
    with pytest.raises(QuantConfigError, match=r'quant_cfg.scope: not supported by QuantizedClassifier'):
        QuantizedClassifier(model, quant_cfg=dict(QUANT_CFG, scope='backbone'))
    with pytest.raises(QuantConfigError, match='quant_cfg.w_bits'):
        QuantizedClassifier(model, quant_cfg=dict(QUANT_CFG, w_bits=12))


def test_split_quant_cfg_rejects_a_non_dict():
    from fqvit_det.mm.quant_model import split_quant_cfg
    with pytest.raises(QuantConfigError, match=r"^quant_cfg: expected a dict, got 'fqvit' \(str\)"):
        split_quant_cfg('fqvit')

