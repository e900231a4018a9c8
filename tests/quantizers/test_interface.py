"""The shared quantizer interface: exact merges of calibration statistics across ranks, and
get_params / set_params round trips, for every quantizer family and observer."""
import pickle

import pytest
import torch
import torch.nn.functional as F

from fqvit_det.quantizers import build_quantizer
from fqvit_det.quantizers.stats import check_round_robin

OBSERVERS = ['MinMaxObserver', 'EMAObserver', 'PercentileObserver', 'OMSEObserver',
             dict(type='PercentileSearchObserver', max_samples=150)]


def act_data(i, shape=(2, 5, 8)):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(shape, generator=g) * (1 + 0.3 * i) + 0.1 * i


def softmax_data(i, shape=(2, 2, 6, 6)):
    g = torch.Generator().manual_seed(200 + i)
    return torch.softmax(torch.randn(shape, generator=g) * (2 + 0.5 * i), -1)


def gelu_data(i, shape=(3, 40)):
    g = torch.Generator().manual_seed(300 + i)
    return F.gelu(torch.randn(shape, generator=g) * (1 + 0.2 * i))


def _uniform(obs, ch_axis):
    return dict(type='UniformQuantizer', bits=4, ch_axis=ch_axis,
                observer=obs if isinstance(obs, dict) else dict(type=obs))


CASES = (
    [(f'uniform-{o if isinstance(o, str) else o["type"]}-{ax}', _uniform(o, ax), act_data)
     for o in OBSERVERS for ax in (None, -1)]
    + [(f'ptf-{o}', dict(type='PTFQuantizer', bits=6, observer=dict(type=o)), act_data)
       for o in ('MinMaxObserver', 'EMAObserver', 'PercentileObserver')]
    + [('uniform-repq', dict(type='UniformQuantizer', bits=4, include_zero=False,
                             clamp_zero_point=False,
                             observer=dict(type='PercentileSearchObserver', max_samples=150)),
        act_data),
       ('ptf-no-zero', dict(type='PTFQuantizer', bits=6, include_zero=False), act_data),
       ('logsqrt2-max', dict(type='LogSqrt2Quantizer', bits=4, max_candidate=True), softmax_data)]
    + [('log2', dict(type='Log2Quantizer', bits=4, delta=None), softmax_data),
       ('logsqrt2', dict(type='LogSqrt2Quantizer', bits=4, max_samples=300), softmax_data),
       ('logsqrt2-nosearch', dict(type='LogSqrt2Quantizer', bits=4, search=False), softmax_data),
       ('lis', dict(type='LogIntSoftmax', bits=4), act_data),
       ('lis-ema', dict(type='LogIntSoftmax', bits=4, logit_observer=dict(type='EMAObserver')),
        act_data),
       ('twin-softmax', dict(type='TwinUniformSoftmaxQuantizer', bits=6, max_samples=200),
        softmax_data),
       ('twin-softmax-subsampled', dict(type='TwinUniformSoftmaxQuantizer', bits=6,
                                        max_samples=100), softmax_data),
       ('twin-gelu', dict(type='TwinUniformGeluQuantizer', bits=6, max_samples=200), gelu_data),
       ('adalog-softmax', dict(type='AdaLogQuantizer', bits=4, max_samples=300), softmax_data),
       ('adalog-gelu', dict(type='AdaLogQuantizer', bits=4, shift=0.16997124, max_samples=250,
                            q_candidates=(10, 20, 37, 50)), gelu_data)])


def observe(q, batches):
    q.set_mode('observe')
    for b in batches:
        q(b)


def assert_same(a, b, path='stats'):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{path}[{i}]')
    else:
        assert a == b, path


@pytest.mark.parametrize('name,cfg,data', CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize('world,num_batches', [(2, 6), (2, 7), (3, 7), (3, 8), (3, 2)])
def test_round_robin_merge_is_exact(name, cfg, data, world, num_batches):
    batches = [data(i) for i in range(num_batches)]
    single = build_quantizer(cfg)
    observe(single, batches)
    assert single.num_observed == num_batches
    expected_stats = single.calibration_stats()

    ranks = [build_quantizer(cfg) for _ in range(world)]
    for r, q in enumerate(ranks):
        observe(q, batches[r::world])
        assert q.num_observed == len(batches[r::world])
    per_rank = pickle.loads(pickle.dumps([q.calibration_stats() for q in ranks]))
    merged = build_quantizer(cfg).merge_calibration_stats(per_rank)
    assert_same(merged, expected_stats)

    fresh = build_quantizer(cfg)
    fresh.load_calibration_stats(merged)
    assert fresh.num_observed == num_batches
    fresh.finalize()
    single.finalize()
    p_single, p_fresh = single.get_params(), fresh.get_params()
    assert_same(p_fresh, p_single, 'params')


@pytest.mark.parametrize('name,cfg,data', CASES, ids=[c[0] for c in CASES])
def test_get_set_params_round_trip(name, cfg, data):
    batches = [data(i) for i in range(3)]
    q = build_quantizer(cfg)
    observe(q, batches)
    q.finalize()
    q.set_mode('quant')
    params = q.get_params()
    assert params and all(isinstance(v, torch.Tensor) for v in params.values())
    fresh = build_quantizer(cfg)
    fresh.set_params(**params)
    assert bool(fresh.calibrated)
    fresh.set_mode('quant')
    x = data(7)
    assert torch.equal(fresh(x), q(x))
    assert_same(fresh.get_params(), params, 'params')
    # get_params returns copies
    for v in params.values():
        v.zero_() if v.is_floating_point() else None
    assert torch.equal(fresh(x), q(x))
    with pytest.raises((TypeError, ValueError), match='not_a_param'):
        fresh.set_params(not_a_param=1.0)


def test_set_params_changes_shape_and_device_dtype():
    q = build_quantizer(dict(type='UniformQuantizer', bits=8, ch_axis=0))
    q.set_params(scale=[0.1, 0.2, 0.3], zero_point=3)
    assert q.scale.shape == (3,) and q.zero_point.shape == (3,)
    assert q.scale.dtype == torch.float32 and bool(q.calibrated)
    q.set_mode('quant')
    x = torch.randn(3, 4)
    ref = (torch.clamp(torch.round(x / q.scale[:, None]) + 3, 0, 255) - 3) * q.scale[:, None]
    assert torch.equal(q(x), ref)


def test_stats_released_by_finalize_but_count_kept():
    q = build_quantizer(_uniform('OMSEObserver', None))
    observe(q, [act_data(0), act_data(1)])
    q.finalize()
    assert q.num_observed == 2
    q.reset()
    assert q.num_observed == 0 and not bool(q.calibrated)


def test_statistics_not_in_state_dict():
    for name, cfg, data in CASES:
        q = build_quantizer(cfg)
        observe(q, [data(0), data(1)])
        keys = set(q.state_dict())
        if cfg['type'] == 'LogIntSoftmax':
            want = {'calibrated', 'logit_quant.calibrated', 'logit_quant.scale',
                    'logit_quant.zero_point'}
        else:
            want = {'calibrated', *q.PARAMS} | ({'lut'} if cfg['type'] == 'AdaLogQuantizer' else set())
        assert keys == want, name


def test_merge_rejects_counts_that_are_not_round_robin():
    with pytest.raises(ValueError, match='round-robin'):
        check_round_robin([2, 4])
    q = build_quantizer(_uniform('EMAObserver', None))
    a, b = build_quantizer(_uniform('EMAObserver', None)), build_quantizer(_uniform('EMAObserver', None))
    observe(a, [act_data(0)])
    observe(b, [act_data(1), act_data(2)])
    with pytest.raises(ValueError, match='round-robin'):
        q.merge_calibration_stats([a.calibration_stats(), b.calibration_stats()])


def test_ranks_without_batches_merge():
    cfg = dict(type='AdaLogQuantizer', bits=4, max_samples=300)
    single = build_quantizer(cfg)
    observe(single, [softmax_data(0)])
    ranks = [build_quantizer(cfg) for _ in range(3)]
    observe(ranks[0], [softmax_data(0)])
    merged = single.merge_calibration_stats([q.calibration_stats() for q in ranks])
    assert_same(merged, single.calibration_stats())
