"""Integer GEMM modules against the simulated fake-quant Linear, written from the formulas."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqvit_det.integer import IntegerLinear, IntegerPatchEmbed, pack_int4, unpack_int4
from fqvit_det.integer.linear import dyadic
from fqvit_det.quantizers.twin import TwinUniformGeluQuantizer, twin_gelu_fake_quant
from fqvit_det.quantizers.uniform import UniformQuantizer


def _q(bits, scale, zero_point, symmetric=False, ch_axis=None, name='q'):
    q = UniformQuantizer(bits=bits, symmetric=symmetric, ch_axis=ch_axis)
    q.qname = name
    q.set_params(scale=torch.as_tensor(scale, dtype=torch.float32),
                 zero_point=torch.as_tensor(zero_point, dtype=torch.float32))
    q.set_mode('quant')
    return q


def _weight_quantizer(w, bits, symmetric):
    q = UniformQuantizer(bits=bits, symmetric=symmetric, ch_axis=0)
    q.qname = 'w'
    q.observe(w)
    q.finalize()
    q.set_mode('quant')
    return q


def _exact(x, w, b, in_q, w_q):
    """Δ_x·Δ_w·Σ(q_x − z_x)(q_w − z_w) + b in float64 (the integer GEMM's specification)."""
    qx = (in_q.quantize(x) - in_q.zero_point).double()
    qw = (w_q.quantize(w) - w_q.zero_point[:, None]).double()
    return (qx @ qw.t()) * (in_q.scale.double() * w_q.scale.double()) + b.double()


@pytest.mark.parametrize('w_bits,symmetric', [(8, True), (8, False), (6, True), (4, False)])
def test_float_output_matches_the_integer_formula_and_the_simulation(w_bits, symmetric, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g) * 0.1
    b = torch.randn(24, generator=g)
    x = torch.randn(3, 7, 40, generator=g)
    in_q = _q(8, 0.02, 131)
    w_q = _weight_quantizer(w, w_bits, symmetric)
    lin = IntegerLinear.from_quant(w, b, w_q, in_q).to(device)
    assert lin.weight_codes.dtype == torch.int8 and lin.bias_int.dtype == torch.int32
    assert lin.has_offset == (w_bits == 8 and not symmetric)   # 8-bit asymmetric: codes − 128
    y = lin(x.to(device)).cpu()
    exact = _exact(x, w, b, in_q, w_q)
    # exact integer accumulator, float32 rescale and bias: float32 rounding only
    assert ((y.double() - exact).abs() <= 1e-6 * exact.abs().max()).all()
    sim = F.linear(in_q.fake_quant(x), w_q.fake_quant(w), b)
    torch.testing.assert_close(y, sim, rtol=0, atol=1e-5)


def test_dyadic_requantization_within_one_code_of_the_simulation(device):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g) * 0.05
    b = torch.randn(32, generator=g) * 0.1
    x = torch.rand(4, 50, 64, generator=g) * 3 - 1
    in_q = _q(8, 4 / 255, 64)
    w_q = UniformQuantizer(bits=8, symmetric=True, ch_axis=0, symmetric_divisor='half_range')
    w_q.qname = 'w'
    w_q.observe(w)
    w_q.finalize()
    w_q.set_mode('quant')
    out_q = _q(8, 0.03, 120)
    lin = IntegerLinear.from_quant(w, b, w_q, in_q, out_q, requant='dyadic').to(device)
    assert lin.out_mode == 'dyadic'
    codes = lin.requantize(lin.accumulate(x.reshape(-1, 64).to(device))).cpu()
    sim_codes = out_q.quantize(F.linear(in_q.fake_quant(x), w_q.fake_quant(w), b)).reshape(-1, 32)
    diff = (codes - sim_codes).abs()
    assert int(diff.max()) <= 1                      # the asserted bound of the dyadic multiplier
    assert float((diff == 0).float().mean()) > 0.99
    y = lin(x.to(device)).cpu()
    torch.testing.assert_close(y, out_q.dequantize(codes.to(torch.int32)).reshape(4, 50, 32))


def test_float_requantization_is_the_quantizers_rounding_of_the_exact_rescale(device):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g) * 0.05
    b = torch.randn(32, generator=g) * 0.1
    x = torch.rand(4, 50, 64, generator=g) * 3 - 1
    in_q = _q(8, 4 / 255, 64)
    w_q = UniformQuantizer(bits=8, symmetric=True, ch_axis=0, symmetric_divisor='half_range')
    w_q.qname = 'w'
    w_q.observe(w)
    w_q.finalize()
    w_q.set_mode('quant')
    out_q = _q(8, 0.03, 120)
    lin = IntegerLinear.from_quant(w, b, w_q, in_q, out_q).to(device)
    assert lin.out_mode == 'requant'
    a = in_q.quantize(x).to(torch.int64) - 64
    wc = w_q.quantize(w).to(torch.int64)
    acc_scale = (in_q.scale.double() * w_q.scale.reshape(-1).double()).float()
    y = (a @ wc.t()).to(torch.float32) * acc_scale + b           # integer accumulator, float32 rescale
    codes = lin.forward_codes(x.to(device)).cpu()
    assert torch.equal(codes, out_q.quantize(y))
    assert torch.equal(lin(x.to(device)).cpu(), out_q.fake_quant(y))


def test_dyadic_multiplier_accuracy():
    real = torch.tensor([3e-4, 1.7e-3, 0.25])
    mult, shift = dyadic(real)
    approx = mult.double() / 2.0 ** shift
    assert int(mult.max()) < 2 ** 31
    assert ((approx - real.double()).abs() <= 0.5 / 2.0 ** shift).all()


@pytest.mark.parametrize('m', [3, 0, -2])
def test_twin_gelu_input_is_exact(m, device):
    """PTQ4ViT post-GELU twin codes: two int8 row blocks meeting in the finer unit by a shift."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 48, generator=g) * 0.1
    b = torch.randn(16, generator=g)
    x = F.gelu(torch.randn(5, 48, generator=g) * 2)
    in_q = TwinUniformGeluQuantizer(bits=6)
    in_q.qname = 'gelu'
    in_q.set_params(pos_exp=m)
    in_q.mark_calibrated()
    in_q.set_mode('quant')
    w_q = _weight_quantizer(w, 6, True)
    lin = IntegerLinear.from_quant(w, b, w_q, in_q).to(device)
    y = lin(x.to(device)).cpu().double()
    ref = twin_gelu_fake_quant(x, m, 6).double() @ w_q.fake_quant(w).double().t() + b.double()
    assert ((y - ref).abs() <= 1e-5 * ref.abs().max()).all()


def test_patch_embedding_equals_the_convolution(device):
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    in_q = _q(8, 0.03, 128)
    w_q = _weight_quantizer(conv.weight.detach(), 8, True)
    lin = IntegerLinear.from_quant(conv.weight, conv.bias, w_q, in_q)
    pe = IntegerPatchEmbed(lin, (4, 4), 8).to(device)
    ref = F.conv2d(in_q.fake_quant(x), w_q.fake_quant(conv.weight.detach()), conv.bias, stride=4)
    torch.testing.assert_close(pe(x.to(device)).cpu(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize('k', [6, 7])
def test_int4_pack_unpack_round_trip(k):
    g = torch.Generator().manual_seed(4)
    low = torch.randint(-20, 5, (5, 1), generator=g)
    codes = (low + torch.randint(0, 16, (5, k), generator=g)).to(torch.int8)
    packed, lo = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert lo.shape == (5,)                        # rows in different 16-value windows
    assert torch.equal(unpack_int4(packed, lo, k), codes)
    symmetric = torch.randint(-8, 8, (5, k), generator=g).to(torch.int8)
    packed, lo = pack_int4(symmetric)
    assert lo.shape == () and int(lo) == int(symmetric.min())   # one offset for the tensor
    assert torch.equal(unpack_int4(packed, lo, k), symmetric)
    with pytest.raises(ValueError, match='16 code values'):
        pack_int4(torch.tensor([[0, 16]], dtype=torch.int8))
