"""PTQ4ViT twin uniform quantizers, checked against float64 references written from the formulas."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fqvit_det.quantizers import QUANTIZERS, build_quantizer
from fqvit_det.quantizers.twin import TwinUniformGeluQuantizer, TwinUniformSoftmaxQuantizer

GELU_MIN = 0.16997124
BITS = (2, 4, 6, 8)


# --- references (plain Python floats, one value at a time) -------------------------------------
def _near_tie(t):
    return abs(t - math.floor(t) - 0.5) < 1e-4


def ref_softmax(x, i, bits):
    """Paper Eq. 4: one region per value. Returns (codes, values, tie-mask)."""
    n = 2 ** (bits - 1) - 1
    s = 2.0 ** (-i)
    d1, d2 = s / n, 1.0 / n
    codes, vals, ties = [], [], []
    for v in x.reshape(-1).tolist():
        if v < s:
            t = v / d1
            k = min(max(round(t), 0), n)
            codes.append(k)
            vals.append(k * d1)
        else:
            t = v / d2
            k = min(max(round(t), 0), n)
            codes.append(2 ** (bits - 1) + k)
            vals.append(k * d2)
        ties.append(_near_tie(t))
    return (torch.tensor(codes), torch.tensor(vals, dtype=torch.float64),
            torch.tensor(ties, dtype=torch.bool))


def ref_gelu(x, m, bits):
    h = 2 ** (bits - 1)
    dn = GELU_MIN / h
    dp = dn * 2.0 ** m
    codes, vals, ties = [], [], []
    for v in x.reshape(-1).tolist():
        if v < 0:
            t = v / dn
            k = min(max(round(t), -h), 0)
            if k < 0:
                codes.append(-k - 1)      # MSB 0, stored magnitude |level| - 1
                vals.append(k * dn)
            else:
                codes.append(h)           # rounds to zero: positive-region zero
                vals.append(0.0)
        else:
            t = v / dp
            k = min(max(round(t), 0), h - 1)
            codes.append(h + k)
            vals.append(k * dp)
        ties.append(_near_tie(t))
    return (torch.tensor(codes), torch.tensor(vals, dtype=torch.float64),
            torch.tensor(ties, dtype=torch.bool))


def ref_mse(x, fn, exp, bits):
    _, vals, _ = fn(x, exp, bits)
    return float(((vals - x.reshape(-1).double()) ** 2).mean())


def softmax_data(seed=0, shape=(2, 3, 12, 12), temp=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * temp).softmax(-1)


def gelu_data(seed=0, shape=(2, 12, 24), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.gelu(torch.randn(shape, generator=g) * scale)


def calibrated(cls, bits, *batches, **kw):
    q = cls(bits=bits, **kw)
    q.set_mode('observe')
    for b in batches:
        q(b)
    q.finalize()
    q.set_mode('quant')
    return q


def check_against_ref(q, x, ref_fn, exp, bits):
    codes = q.quantize(x)
    assert not codes.dtype.is_floating_point and codes.dtype != torch.bool
    ref_codes, ref_vals, ties = ref_fn(x, exp, bits)
    ok = ~ties
    assert torch.equal(codes.reshape(-1)[ok].long(), ref_codes[ok])
    vals = q.fake_quant(x).reshape(-1).double()
    torch.testing.assert_close(vals[ok], ref_vals[ok], rtol=1e-6, atol=1e-12)
    assert torch.equal(q.dequantize(codes), q.fake_quant(x))
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1


# --- post-softmax ---------------------------------------------------------------------------
SOFTMAX_SPECIALS = [0.0, 1.0, 0.5, 0.25, 2.0 ** -3, 2.0 ** -3 - 1e-6, 1e-7, 1.5, -0.1, 0.999]


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('i', [0, 3, 7, 19])
def test_softmax_codes_and_values_match_reference(bits, i):
    x = torch.cat([softmax_data(i).reshape(-1)[:300], torch.tensor(SOFTMAX_SPECIALS)])
    q = TwinUniformSoftmaxQuantizer(bits=bits)
    q.set_params(split_exp=i)
    assert int(q.split_exp) == i and bool(q.calibrated)
    check_against_ref(q, x, ref_softmax, i, bits)
    # MSB = region flag: 1 exactly for the values at or above the split
    codes = q.quantize(x)
    flag = (codes >> (bits - 1)) & 1
    assert torch.equal(flag.bool(), x >= 2.0 ** (-i))


@pytest.mark.parametrize('bits', BITS)
def test_softmax_one_region_per_value_not_the_sum(bits):
    # Official code adds both regions' reconstructions: a value >= s came out ~s too high.
    n = 2 ** (bits - 1) - 1
    i = 4
    s = 2.0 ** -i
    q = TwinUniformSoftmaxQuantizer(bits=bits)
    q.set_params(split_exp=i)
    x = torch.linspace(0, 1, 2001)
    err = (q.fake_quant(x).double() - x.double()).abs()
    bound = torch.where(x < s, torch.full_like(x, s / n / 2), torch.full_like(x, 1 / n / 2)).double()
    assert (err <= bound + 1e-7).all()
    summed_large = torch.clamp(torch.round(x / (1 / n)), 0, n) / n + s  # official behaviour above s
    above = x >= s
    assert ((summed_large[above] - q.fake_quant(x)[above]).abs() > s / 2).all()


@pytest.mark.parametrize('bits', BITS)
def test_softmax_finalize_picks_mse_minimum(bits):
    batches = [softmax_data(1), softmax_data(2, temp=6.0)]
    q = calibrated(TwinUniformSoftmaxQuantizer, bits, *batches)
    x = torch.cat([b.reshape(-1) for b in batches])
    errs = [ref_mse(x, ref_softmax, i, bits) for i in range(20)]
    chosen = int(q.split_exp)
    assert 0 <= chosen <= 19
    assert errs[chosen] <= min(errs) * (1 + 1e-6) + 1e-15
    check_against_ref(q, x, ref_softmax, chosen, bits)


def test_softmax_zeros_constant_and_outlier():
    q = calibrated(TwinUniformSoftmaxQuantizer, 8, torch.zeros(4, 16))
    assert torch.equal(q(torch.zeros(3, 5)), torch.zeros(3, 5))
    assert int(q.split_exp) == 0              # every split ties at zero error: the first one
    assert torch.equal(q.quantize(torch.zeros(2)), torch.zeros(2, dtype=torch.int32))

    const = torch.full((4, 197), 1 / 197)
    q = calibrated(TwinUniformSoftmaxQuantizer, 8, const)
    errs = [ref_mse(const, ref_softmax, i, 8) for i in range(20)]
    assert errs[int(q.split_exp)] <= min(errs) * (1 + 1e-6) + 1e-15
    check_against_ref(q, const, ref_softmax, int(q.split_exp), 8)

    # one huge probability among tiny ones (a peaked attention row)
    x = torch.full((1, 1000), 1e-4)
    x[0, 17] = 1.0
    q = calibrated(TwinUniformSoftmaxQuantizer, 8, x)
    errs = [ref_mse(x, ref_softmax, i, 8) for i in range(20)]
    assert errs[int(q.split_exp)] <= min(errs) * (1 + 1e-6) + 1e-15
    out = q(x)
    assert abs(float(out[0, 17]) - 1.0) < 1e-6
    assert (out[0, :17] - 1e-4).abs().max() < 1e-5      # the small values are not crushed to 0
    # inputs outside [0, 1] clamp
    assert torch.allclose(q(torch.tensor([7.0, -3.0])), torch.tensor([1.0, 0.0]), atol=1e-6)


# --- post-GELU -------------------------------------------------------------------------------
GELU_SPECIALS = [0.0, -GELU_MIN, -0.75, -1e-4, -0.3, 1e-6, 0.5, 3.0, 100.0]


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('m', [-5, 0, 3, 24])
def test_gelu_codes_and_values_match_reference(bits, m):
    x = torch.cat([gelu_data(m + 10).reshape(-1)[:300], torch.tensor(GELU_SPECIALS)])
    q = TwinUniformGeluQuantizer(bits=bits)
    q.set_params(m=m)
    assert q.m == m and int(q.pos_exp) == m
    check_against_ref(q, x, ref_gelu, m, bits)
    codes = q.quantize(x)
    h = 2 ** (bits - 1)
    # MSB 1 = positive region (incl. zero); MSB 0 only for strictly negative reconstructions
    assert torch.equal(codes >= h, q.fake_quant(x) >= 0)
    # negative region spans down to GELU's minimum exactly
    assert abs(float(q.fake_quant(torch.tensor([-GELU_MIN]))) - (-GELU_MIN)) < 1e-6


@pytest.mark.parametrize('bits', BITS)
def test_gelu_all_codes_distinct_values(bits):
    q = TwinUniformGeluQuantizer(bits=bits)
    q.set_params(m=2)
    codes = torch.arange(2 ** bits, dtype=torch.int32)
    vals = q.dequantize(codes)
    assert torch.unique(vals).numel() == 2 ** bits        # no code wasted on a second zero
    assert torch.equal(q.quantize(vals), codes)           # codes round-trip


@pytest.mark.parametrize('bits', BITS)
def test_gelu_finalize_picks_mse_minimum(bits):
    batches = [gelu_data(3), gelu_data(4, scale=4.0)]
    q = calibrated(TwinUniformGeluQuantizer, bits, *batches)
    x = torch.cat([b.reshape(-1) for b in batches])
    errs = [ref_mse(x, ref_gelu, m, bits) for m in range(-5, 25)]
    assert -5 <= q.m <= 24
    assert errs[q.m + 5] <= min(errs) * (1 + 1e-6) + 1e-15
    check_against_ref(q, x, ref_gelu, q.m, bits)


def test_gelu_zeros_constant_and_outlier():
    q = calibrated(TwinUniformGeluQuantizer, 8, torch.zeros(5, 7))
    assert torch.equal(q(torch.zeros(2, 3)), torch.zeros(2, 3))
    assert torch.equal(q.quantize(torch.zeros(2)), torch.full((2,), 128, dtype=torch.int32))

    const = torch.full((3, 50), 0.5)
    q = calibrated(TwinUniformGeluQuantizer, 8, const)
    errs = [ref_mse(const, ref_gelu, m, 8) for m in range(-5, 25)]
    assert errs[q.m + 5] <= min(errs) * (1 + 1e-6) + 1e-15

    x = gelu_data(5).reshape(-1).clone()
    x[11] = 1e4
    q = calibrated(TwinUniformGeluQuantizer, 8, x)
    errs = [ref_mse(x, ref_gelu, m, 8) for m in range(-5, 25)]
    assert errs[q.m + 5] <= min(errs) * (1 + 1e-6) + 1e-15
    out = q(x)
    assert torch.isfinite(out).all()
    check_against_ref(q, x, ref_gelu, q.m, 8)


# --- shared behaviour --------------------------------------------------------------------------
CASES = [(TwinUniformSoftmaxQuantizer, softmax_data), (TwinUniformGeluQuantizer, gelu_data)]


@pytest.mark.parametrize('cls,data', CASES)
def test_state_dict_and_safetensors_roundtrip(cls, data, tmp_path):
    x = data(7)
    q = calibrated(cls, 6, x)
    ref = q(x)
    for via_file in (False, True):
        sd = q.state_dict()
        if via_file:
            path = tmp_path / 'q.safetensors'
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
            sd = load_file(str(path))
        fresh = cls(bits=6)
        assert not bool(fresh.calibrated)
        fresh.load_state_dict(sd)
        fresh.set_mode('quant')
        assert torch.equal(fresh(x), ref)
        assert torch.equal(fresh.quantize(x), q.quantize(x))


@pytest.mark.parametrize('cls,data', CASES)
def test_deterministic_with_subsampling(cls, data):
    batches = [data(s, scale=1.0) if cls is TwinUniformGeluQuantizer else data(s) for s in range(4)]
    qs = [calibrated(cls, 4, *batches, max_samples=300) for _ in range(2)]
    name = cls.EXP_NAME
    assert torch.equal(getattr(qs[0], name), getattr(qs[1], name))
    assert torch.equal(qs[0](batches[0]), qs[1](batches[0]))


@pytest.mark.parametrize('cls,data', CASES)
def test_pool_is_bounded_and_batches_weigh_equally(cls, data):
    q = cls(bits=8, max_samples=1000)
    q.set_mode('observe')
    for s in range(6):
        q(data(s, shape=(1, 3000)))
    parts = q.calibration_stats()['pool']
    assert len(parts) == 6 and q.num_observed == 6
    assert sum(p.numel() for p in parts) <= 1000
    assert len({p.numel() for p in parts}) == 1
    q.finalize()
    assert q.num_observed == 6
    with pytest.raises(RuntimeError, match='released'):
        q.finalize()


@pytest.mark.parametrize('cls,data', CASES)
@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_observe_raises(cls, data, bad):
    q = cls(bits=8)
    q.set_mode('observe')
    x = data(0).clone()
    x.reshape(-1)[5] = bad
    with pytest.raises(ValueError):
        q(x)
    with pytest.raises(ValueError):
        q.observe(x)


@pytest.mark.parametrize('cls,data', CASES)
def test_lifecycle_errors_and_registry(cls, data):
    q = cls(bits=8)
    with pytest.raises(RuntimeError):
        q.set_mode('quant')
    with pytest.raises(RuntimeError):
        q.finalize()
    x = data(1)
    q.set_mode('float')
    assert q(x) is x
    q.set_mode('observe')
    assert q(x) is x
    assert cls.__name__ in QUANTIZERS
    built = build_quantizer(dict(type=cls.__name__, bits=4))
    assert isinstance(built, cls) and built.bits == 4


def test_set_params_validation():
    q = TwinUniformSoftmaxQuantizer()
    for bad in (-1, 20, 100):
        with pytest.raises(ValueError):
            q.set_params(split_exp=bad)
    g = TwinUniformGeluQuantizer()
    for bad in (-6, 25):
        with pytest.raises(ValueError):
            g.set_params(m=bad)
    assert not bool(q.calibrated) and not bool(g.calibrated)


@pytest.mark.parametrize('cls,data,exp', [(TwinUniformSoftmaxQuantizer, softmax_data, 5),
                                           (TwinUniformGeluQuantizer, gelu_data, 7)])
def test_dtype_preserved_and_straight_through_gradient(cls, data, exp):
    q = cls(bits=8)
    q.set_params(exp)
    q.set_mode('quant')
    x = data(2).clone().requires_grad_(True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))     # all values inside the clamp ranges
    xh = data(2).half()
    assert q(xh).dtype == torch.float16
    # fake_quant_with a batch of candidate exponents = one call per candidate
    xb = data(3)
    cands = torch.tensor(q.candidate_exps()[:4]).reshape(-1, *([1] * xb.dim()))
    batched = q.fake_quant_with(xb, cands)
    for k in range(4):
        assert torch.equal(batched[k], q.fake_quant_with(xb, int(cands[k])))
