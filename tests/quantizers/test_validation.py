"""Constructor arguments are checked at build time; the error names the argument."""
import pytest

from fqvit_det.quantizers import build_observer, build_quantizer

BAD_QUANTIZERS = [
    (dict(type='UniformQuantizer', bits=True), 'bits'),
    (dict(type='UniformQuantizer', bits=8.0), 'bits'),
    (dict(type='UniformQuantizer', bits=1), 'bits'),
    (dict(type='UniformQuantizer', bits=17), 'bits'),
    (dict(type='UniformQuantizer', ch_axis='x'), 'ch_axis'),
    (dict(type='UniformQuantizer', ch_axis=1.0), 'ch_axis'),
    (dict(type='UniformQuantizer', ch_axis=True), 'ch_axis'),
    (dict(type='UniformQuantizer', symmetric='yes'), 'symmetric'),
    (dict(type='UniformQuantizer', symmetric=1), 'symmetric'),
    (dict(type='UniformQuantizer', signed=0), 'signed'),
    (dict(type='UniformQuantizer', include_zero='no'), 'include_zero'),
    (dict(type='UniformQuantizer', clamp_zero_point=1), 'clamp_zero_point'),
    (dict(type='UniformQuantizer', symmetric_divisor='127.5'), 'symmetric_divisor'),
    (dict(type='UniformQuantizer', observer=3), 'observer'),
    (dict(type='UniformQuantizer', observer='MedianObserver'), 'observer'),
    (dict(type='UniformQuantizer', observer=dict(sigma=0.1)), 'observer'),
    (dict(type='UniformQuantizer', observer=dict(type='MinMaxObserver', ch_axis=0)), 'ch_axis'),
    (dict(type='UniformQuantizer', observer=dict(type='EMAObserver', sigma=0)), 'sigma'),
    (dict(type='UniformQuantizer', observer=dict(type='EMAObserver', sigma=1.5)), 'sigma'),
    (dict(type='UniformQuantizer', observer=dict(type='EMAObserver', sigma='0.01')), 'sigma'),
    (dict(type='UniformQuantizer', observer=dict(type='PercentileObserver', tail=0.6)), 'tail'),
    (dict(type='UniformQuantizer', observer=dict(type='OMSEObserver', num_candidates=0)),
     'num_candidates'),
    (dict(type='UniformQuantizer', observer=dict(type='OMSEObserver', step=0.02)), 'step'),
    (dict(type='UniformQuantizer',
          observer=dict(type='PercentileSearchObserver', percentiles=(0.3, 0.99))), 'percentiles'),
    (dict(type='UniformQuantizer',
          observer=dict(type='PercentileSearchObserver', percentiles=0.99)), 'percentiles'),
    (dict(type='UniformQuantizer',
          observer=dict(type='PercentileSearchObserver', percentiles=(1.0,))), 'percentiles'),
    (dict(type='UniformQuantizer',
          observer=dict(type='PercentileSearchObserver', max_samples=0)), 'max_samples'),
    (dict(type='PTFQuantizer', ch_axis=None), 'ch_axis'),
    (dict(type='PTFQuantizer', num_factors=-1), 'num_factors'),
    (dict(type='PTFQuantizer', num_factors=2.0), 'num_factors'),
    (dict(type='PTFQuantizer', observer='OMSEObserver'), 'observer'),
    (dict(type='PTFQuantizer', include_zero=None), 'include_zero'),
    (dict(type='Log2Quantizer', delta=0.0), 'delta'),
    (dict(type='Log2Quantizer', delta='1'), 'delta'),
    (dict(type='LogSqrt2Quantizer', search='yes'), 'search'),
    (dict(type='LogSqrt2Quantizer', percentiles=(0.4,)), 'percentiles'),
    (dict(type='LogSqrt2Quantizer', max_delta=-1.0), 'max_delta'),
    (dict(type='LogSqrt2Quantizer', max_samples=2.5), 'max_samples'),
    (dict(type='LogSqrt2Quantizer', max_candidate='no'), 'max_candidate'),
    (dict(type='LogIntSoftmax', logit_bits=True), 'logit_bits'),
    (dict(type='LogIntSoftmax', n=0), r'\bn must'),
    (dict(type='LogIntSoftmax', logit_observer='Nope'), 'observer'),
    (dict(type='TwinUniformSoftmaxQuantizer', bits='8'), 'bits'),
    (dict(type='TwinUniformSoftmaxQuantizer', max_samples=0), 'max_samples'),
    (dict(type='TwinUniformGeluQuantizer', seed=-1), 'seed'),
    (dict(type='AdaLogQuantizer', r=0), r'\br must'),
    (dict(type='AdaLogQuantizer', shift=-0.1), 'shift'),
    (dict(type='AdaLogQuantizer', search_scale=1), 'search_scale'),
    (dict(type='AdaLogQuantizer', subtract_shift='yes'), 'subtract_shift'),
    (dict(type='AdaLogQuantizer', q_candidates=[0, 10]), 'q_candidates'),
    (dict(type='AdaLogQuantizer', q_candidates=10), 'q_candidates'),
    (dict(type='AdaLogQuantizer', scale_factors=[]), 'scale_factors'),
    (dict(type='AdaLogQuantizer', scale_factors=[0.5, -1]), 'scale_factors'),
    (dict(type='AdaLogQuantizer', q_init=0), 'q_init'),
    (dict(type='AdaLogQuantizer', max_samples=0), 'max_samples'),
]


@pytest.mark.parametrize('cfg,arg', BAD_QUANTIZERS, ids=[f'{c["type"]}-{a}' for c, a in BAD_QUANTIZERS])
def test_bad_constructor_argument_names_the_argument(cfg, arg):
    with pytest.raises((TypeError, ValueError), match=arg):
        build_quantizer(cfg)


def test_bad_observer_ch_axis_names_the_argument():
    with pytest.raises(TypeError, match='ch_axis'):
        build_observer(dict(type='MinMaxObserver'), ch_axis='x')


def test_valid_configs_build():
    for cfg in (dict(type='UniformQuantizer', bits=4, ch_axis=-1, symmetric=True, signed=True,
                     observer='PercentileObserver', include_zero=False, clamp_zero_point=False,
                     symmetric_divisor='half_range'),
                dict(type='PTFQuantizer', observer=dict(type='EMAObserver', sigma=1)),
                dict(type='Log2Quantizer', delta=None),
                dict(type='LogSqrt2Quantizer', max_delta=None, percentiles=[0.99]),
                dict(type='AdaLogQuantizer', shift=0.16997124, q_candidates=(10, 37))):
        assert build_quantizer(cfg).calibrated.item() is False
