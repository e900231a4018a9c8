"""Versioned state files: round trip, recipe mismatch, corruption, truncation, nothing half-loaded."""
import json

import pytest
import torch

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.presets import make_spec
from fqvit_det.state import (FORMAT, load_quant_state, read_metadata, recipe_differences,
                             save_quant_state)

from .helpers import images, tiny_vit

FQVIT = dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4, ptf=True, lis=True)
REPQ = dict(method='repq', w_bits=4, a_bits=4)
REPQ_GPTQ = dict(method='repq', w_bits=4, a_bits=4,
                 roles=dict(weight=dict(type='GPTQWeightQuantizer', bits=4, act_order=True)))


def converted(cfg, device):
    model = tiny_vit().to(device)
    spec = make_spec(**cfg)
    quantize_model(model, spec)
    return model, spec


def calibrated(cfg, device):
    model, spec = converted(cfg, device)
    x = images(model, 4, seed=2).to(device)
    CalibrationRunner(model, spec, progress=False).run([x[:2], x[2:]])
    return model, spec


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), f'{k} changed by a refused load'


PTQ4VIT = dict(method='ptq4vit', w_bits=6, a_bits=6)       # twin uniform, Hessian-searched scales
ADALOG = dict(method='adalog', w_bits=4, a_bits=4)         # adaptive log base, FPCS-searched


@pytest.mark.parametrize('cfg', [FQVIT, REPQ, REPQ_GPTQ, PTQ4VIT, ADALOG],
                         ids=['fqvit_ptf_lis', 'repq_reparam', 'repq_gptq_weights', 'ptq4vit_search',
                              'adalog_search'])
def test_round_trip_gives_bit_identical_outputs(cfg, tmp_path, device):
    model, spec = calibrated(cfg, device)
    path = save_quant_state(model, str(tmp_path / 'q.safetensors'), spec)
    fresh, spec2 = converted(cfg, device)
    load_quant_state(fresh, path, spec2)
    probe = images(model, 3, seed=7).to(device)
    with torch.no_grad():
        assert torch.equal(model(probe), fresh(probe))
    meta = read_metadata(path)
    assert meta['format'] == FORMAT
    recipe = json.loads(meta['recipe'])
    assert recipe['method'] == cfg['method'] and 'ln_output' in recipe['roles']
    assert len(meta['sha256']) == 64
    if cfg is REPQ_GPTQ:  # the compensated integer weights are in the file
        codes = [k for k in meta_keys(path) if k.endswith('/codes')]
        assert codes and all('w_quantizer' in k for k in codes)


def meta_keys(path):
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        return list(f.keys())


def test_recipe_mismatch_names_file_and_role(tmp_path, device):
    low = dict(FQVIT, roles=dict(ln_output=dict(type='UniformQuantizer', bits=4)))
    model, spec = calibrated(low, device)
    path = save_quant_state(model, str(tmp_path / 'low.safetensors'), spec)
    fresh, spec8 = converted(dict(FQVIT, roles=dict(ln_output=dict(type='UniformQuantizer', bits=8))),
                             device)
    before = snapshot(fresh)
    with pytest.raises(ValueError) as err:
        load_quant_state(fresh, path, spec8, origin='--quant-state')
    msg = str(err.value)
    assert path in msg and '--quant-state' in msg
    assert 'roles.ln_output.bits: saved 4, config asks 8' in msg
    assert_untouched(fresh, before)


def test_recipe_differences_lists_each_key():
    saved = dict(method='fqvit', roles=dict(q=dict(bits=4), k=None), search_cfg={})
    wanted = dict(method='fqvit', roles=dict(q=dict(bits=8), k=dict(bits=8)), search_cfg={'a': 1})
    assert recipe_differences(saved, wanted) == [
        'roles.k: saved null, config asks {"bits": 8}', 'roles.q.bits: saved 4, config asks 8',
        'search_cfg.a: saved absent, config asks 1']


def _data_offset(path):
    with open(path, 'rb') as f:
        header = int.from_bytes(f.read(8), 'little')
    return 8 + header


def test_flipped_byte_is_detected(tmp_path, device):
    model, spec = calibrated(FQVIT, device)
    path = save_quant_state(model, str(tmp_path / 'q.safetensors'), spec)
    raw = bytearray(open(path, 'rb').read())
    pos = _data_offset(path) + (len(raw) - _data_offset(path)) // 2
    raw[pos] ^= 0x10
    open(path, 'wb').write(bytes(raw))
    fresh, spec2 = converted(FQVIT, device)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match='corrupted') as err:
        load_quant_state(fresh, path, spec2, origin='--quant-state')
    assert path in str(err.value)
    assert_untouched(fresh, before)


def test_truncated_file_is_a_value_error_naming_the_flag(tmp_path, device):
    model, spec = calibrated(REPQ, device)
    path = save_quant_state(model, str(tmp_path / 'q.safetensors'), spec)
    raw = open(path, 'rb').read()
    open(path, 'wb').write(raw[:len(raw) - 100])
    fresh, spec2 = converted(REPQ, device)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match='truncated') as err:
        load_quant_state(fresh, path, spec2, origin='--quant-state')
    assert path in str(err.value) and '--quant-state' in str(err.value)
    assert_untouched(fresh, before)


def test_other_model_is_refused_before_loading(tmp_path, device):
    model, spec = calibrated(FQVIT, device)
    path = save_quant_state(model, str(tmp_path / 'q.safetensors'), spec)
    other = tiny_vit()
    other.blocks = other.blocks[:1]
    other.to(device)
    quantize_model(other, spec)
    before = snapshot(other)
    with pytest.raises(ValueError, match='does not match this model'):
        load_quant_state(other, path, spec)
    assert_untouched(other, before)


def test_missing_file_names_the_flag(tmp_path, device):
    model, spec = converted(FQVIT, device)
    with pytest.raises(FileNotFoundError, match='--quant-state'):
        load_quant_state(model, str(tmp_path / 'nope.safetensors'), spec, origin='--quant-state')
