"""Integer Log-Int-Softmax kernel: bit-exact with the simulated LogIntSoftmax; P·V on log2 codes
exact."""
import pytest
import torch

from fqvit_det.integer.softmax import (half_up_thresholds, int_log_softmax, lis_codes_reference,
                                       lis_exp_table, lis_pv)
from fqvit_det.quantizers.lis import LogIntSoftmax, log2_round_half_up
from fqvit_det.quantizers.log import ZERO_CODE


def calibrated_lis(x, bits=4, logit_bits=8):
    lis = LogIntSoftmax(bits=bits, logit_bits=logit_bits, include_zero=False)
    lis.set_mode('observe')
    lis(x)
    lis.finalize()
    lis.set_mode('quant')
    return lis


def test_half_up_thresholds_reproduce_the_integer_log2_rounding():
    r = torch.cat([torch.arange(1, 2 ** 17), torch.tensor([2 ** 40 - 1, 2 ** 40, 3 * 2 ** 39,
                                                          3 * 2 ** 39 - 1, 2 ** 60 + 5])])
    for bits in (4, 6):
        c = torch.tensor(half_up_thresholds(bits), dtype=torch.int64)
        counts = (r.unsqueeze(1) >= c).sum(1)
        assert torch.equal(counts, log2_round_half_up(r).clamp(max=2 ** bits))


@pytest.mark.parametrize('spread,bits', [(0.3, 4), (2.0, 4), (8.0, 4), (30.0, 4), (4.0, 3)])
def test_int_log_softmax_is_bit_exact_with_the_simulation(device, spread, bits):
    g = torch.Generator().manual_seed(int(spread * 10) + bits)
    x = (torch.randn(2, 3, 37, 37, generator=g) * spread).to(device)
    x[0, 0, 3] = 1.5                                   # a constant row: every d = 0
    lis = calibrated_lis(x, bits).to(device)
    lq = lis.logit_quant
    codes = lq.quantize(x)
    ours = int_log_softmax(codes, float(lq.scale), bits, lis.n, lq.qmin, lq.qmax)
    assert ours.dtype == torch.int8 and ours.device == x.device
    sim = lis.quantize(x)
    assert torch.equal(ours.long(), sim.long())
    if spread >= 8:
        assert bool((ours == ZERO_CODE).any())         # the zero code is exercised
    # the literal int64 row-relative algorithm on codes agrees too
    assert torch.equal(lis_codes_reference(codes, float(lq.scale), bits).long(), sim.long())


def test_int_log_softmax_overflowing_table_uses_the_row_relative_algorithm():
    # 16-bit logits, scale 4e-4, 128 keys: T_max·N ≥ 2^61, so the kernel takes the literal
    # row-relative path of the simulation
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 128, generator=g) * 6
    lis = LogIntSoftmax(bits=4, logit_bits=16, include_zero=False)
    lis.set_params(scale=torch.tensor(4e-4), zero_point=torch.tensor(32768.0))
    lis.set_mode('quant')
    lq = lis.logit_quant
    t, _ = lis_exp_table(4e-4, lq.qmax - lq.qmin + 1)
    assert int(t.max()) * 128 >= 2 ** 61
    codes = lq.quantize(x)
    ours = int_log_softmax(codes, float(lq.scale), 4, lis.n, lq.qmin, lq.qmax)
    assert torch.equal(ours.long(), lis.quantize_exact(x).long())
    assert torch.equal(ours.long(), lis.quantize(x).long())


def test_exp_table_is_the_row_relative_exp_up_to_a_power_of_two():
    t, monotone = lis_exp_table(0.05, 256)
    assert monotone and t.dtype == torch.int64 and int(t.min()) >= 0
    assert int(t[0]) > 0


def test_lis_pv_is_exact(device):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-1, 16, (2, 3, 20, 20), generator=g).to(device)   # −1: zero code
    v = torch.randint(0, 256, (2, 3, 20, 8), generator=g).to(device)
    acc, frac = lis_pv(codes, v, 77.0, (0, 255))
    p = torch.exp2(-codes.clamp(min=0).double()) * (codes >= 0)
    ref = p @ (v.double() - 77)                       # every term k·2^−15: exact in float64
    assert acc.dtype == torch.int64
    assert torch.equal(acc.double() * 2.0 ** -frac, ref)
