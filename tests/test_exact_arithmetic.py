"""Integer-exact simulation (``fqvit_det.nn.exact``): GEMMs on codes, against direct references."""
import pytest
import torch
from torch import nn

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.nn import QuantLinear
from fqvit_det.nn.exact import exact_unit, set_exact_arithmetic
from fqvit_det.presets import make_spec
from fqvit_det.quantizers.uniform import UniformQuantizer

from .helpers import images, tiny_vit


def _calibrated_linear(in_signed=False, w_ch_axis=0, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(48, 20, bias=bias)
    iq = UniformQuantizer(bits=4, signed=in_signed)
    wq = UniformQuantizer(bits=4, signed=True, symmetric=True, ch_axis=w_ch_axis)
    mod = QuantLinear.from_float(lin, w_quantizer=wq, in_quantizer=iq)
    x = torch.randn(64, 48) * 3 + (0 if in_signed else 2)
    iq.set_mode('observe')
    iq(x)
    iq.finalize()
    iq.set_mode('quant')
    mod.calibrate_weight()
    wq.set_mode('quant')
    return mod, x


@pytest.mark.parametrize('w_ch_axis', [None, 0])
@pytest.mark.parametrize('bias', [True, False])
def test_exact_linear_is_the_integer_formula(w_ch_axis, bias):
    mod, x = _calibrated_linear(w_ch_axis=w_ch_axis, bias=bias)
    iq, wq = mod.in_quantizer, mod.w_quantizer
    with torch.no_grad():
        default = mod(x)
        assert set_exact_arithmetic(mod) == 1
        exact = mod(x)
    # reference: int64 accumulator of centred codes, then float32 rescale and bias
    a = iq.quantize(x).to(torch.int64) - int(iq.zero_point)
    b = wq.quantize(mod.weight.detach()).to(torch.int64) - wq.zero_point.to(torch.int64).reshape(-1, 1)
    acc = a @ b.t()
    s_w = wq.scale.reshape(-1).float().expand(20)
    ref = acc.to(torch.float32) * (iq.scale.double() * s_w.double()).float()
    if bias:
        ref = ref + mod.bias.detach()
    assert torch.equal(exact, ref)
    # the float32 simulation computes the same quantity with rounding in the GEMM
    assert float((exact - default).abs().max()) < 1e-4 * float(ref.abs().max())
    set_exact_arithmetic(mod, False)
    with torch.no_grad():
        assert torch.equal(mod(x), default)


def test_exact_arithmetic_skips_what_has_no_uniform_grid():
    mod, x = _calibrated_linear()
    mod.in_quantizer.set_mode('float')
    assert exact_unit(mod.in_quantizer) is None
    assert set_exact_arithmetic(mod) == 0
    with torch.no_grad():
        assert torch.equal(mod(x), nn.functional.linear(x, mod.quant_weight(), mod.bias))


PRESETS = {
    'fqvit_884': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4),
    'ptq4vit_w6a6': dict(method='ptq4vit', w_bits=6, a_bits=6, search=None),
    'repq_w4a4': dict(method='repq', w_bits=4, a_bits=4),
    'adalog_w4a4': dict(method='adalog', w_bits=4, a_bits=4, search=None),
}


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_exact_simulation_of_a_tiny_vit(name):
    """Exact mode computes attention on the codes: close to the float32 simulation, and the same
    model calibrated once gives one answer whatever the batch split (GEMM order no longer matters)."""
    model = tiny_vit()
    x = images(model, 8)
    spec = make_spec(**PRESETS[name])
    quantize_model(model, spec)
    CalibrationRunner(model, spec, progress=False).run([x[:4], x[4:]])
    with torch.no_grad():
        default = model(x)
        n = set_exact_arithmetic(model)
        exact = model(x)
        split = torch.cat([model(x[:3]), model(x[3:])])
    assert n >= 2 * 4 + 1      # the two attentions, qkv/proj/fc1 of each block at least, the head
    assert torch.equal(exact, split)
    assert torch.equal(exact.argmax(1), default.argmax(1))
    assert float((exact - default).abs().max()) < 0.1 * float(default.abs().max())


def test_float_input_gemms_run_in_float64():
    """With ``float_input_gemm='float64'`` a quantized layer on a float input (PTQ4ViT's patch
    embedding) computes float32(Σ x·ŵ in float64) + bias: the same float32 bits whatever the
    summation order (a conv and a patch-row MatMul agree); by default, and switched off, it
    computes as the float32 simulation; a convolution whose windows overlap keeps its kernel."""
    from fqvit_det.integer.linear import patch_rows
    from fqvit_det.nn.exact import float64_gemm_on
    model = tiny_vit()
    x = images(model, 4)
    spec = make_spec(**PRESETS['ptq4vit_w6a6'])
    quantize_model(model, spec)
    CalibrationRunner(model, spec, progress=False).run([x])
    conv = model.patch_embed.proj
    assert conv.in_quantizer is None
    with torch.no_grad():
        f32 = conv(x)
        set_exact_arithmetic(model)
        assert not float64_gemm_on(conv) and torch.equal(conv(x), f32)
        with pytest.raises(ValueError, match="float_input_gemm must be one of"):
            set_exact_arithmetic(model, float_input_gemm='float16')
        set_exact_arithmetic(model, float_input_gemm='float64')
        assert float64_gemm_on(conv)
        y = conv(x)
        w = conv.quant_weight().double()
        ref = nn.functional.conv2d(x.double(), w, None, conv.stride).float() + conv.bias.reshape(-1, 1, 1)
        rows, (gh, gw) = patch_rows(x, conv.kernel_size)
        by_rows = (rows.double() @ w.reshape(w.shape[0], -1).t()).float() + conv.bias
        assert torch.equal(y, ref)
        assert torch.equal(y, by_rows.transpose(1, 2).reshape(y.shape))
        assert float((y - f32).abs().max()) < 1e-4 * float(f32.abs().max())
        set_exact_arithmetic(model, False)
        assert not float64_gemm_on(conv) and torch.equal(conv(x), f32)
        # the context manager restores what was on before it
        from fqvit_det.nn.exact import exact_arithmetic, exact_arithmetic_on
        set_exact_arithmetic(model)
        with exact_arithmetic(model, float_input_gemm='float64'):
            assert torch.equal(conv(x), y)
        assert exact_arithmetic_on(model) and not float64_gemm_on(conv)
        set_exact_arithmetic(model, False)
        with exact_arithmetic(model, float_input_gemm='float64'):
            assert float64_gemm_on(conv)
        assert not exact_arithmetic_on(model)
    overlapping = torch.nn.Conv2d(3, 8, 3, padding=1)
    from fqvit_det.nn.modules import QuantConv2d
    q = QuantConv2d.from_float(overlapping, w_quantizer=UniformQuantizer(bits=8, ch_axis=0))
    q.w_quantizer.observe(q.weight.detach())
    q.w_quantizer.finalize()
    q.w_quantizer.set_mode('quant')
    assert set_exact_arithmetic(q, float_input_gemm='float64') == 0 and not float64_gemm_on(q)


def test_exact_layers_read_their_grids_at_each_forward():
    """Switched on once, a layer follows later changes of its quantizers (a reloaded state, a
    quantizer turned off) instead of computing with stale constants."""
    mod, x = _calibrated_linear()
    set_exact_arithmetic(mod)
    iq = mod.in_quantizer
    with torch.no_grad():
        mod(x)                         # constants cached for the first grid
    iq.set_params(scale=iq.scale * 2)
    with torch.no_grad():
        exact = mod(x)
        a = iq.quantize(x).to(torch.int64) - int(iq.zero_point)
    b = mod.w_quantizer.quantize(mod.weight.detach()).to(torch.int64)
    s_w = mod.w_quantizer.scale.reshape(-1).float()
    ref = (a @ b.t()).to(torch.float32) * (iq.scale.double() * s_w.double()).float() + mod.bias.detach()
    assert torch.equal(exact, ref)
    iq.set_mode('float')
    with torch.no_grad():
        assert torch.equal(mod(x), nn.functional.linear(x, mod.quant_weight(), mod.bias))


def test_rational_gelu_is_gelu_within_the_erf_approximation():
    """A&S 7.1.28 (|erf error| ≤ 3e-7) evaluated in float32, where P^16 multiplies P's rounding
    by 16: |GELU error| ≤ 1e-6·|x| (torch's own float32 GELU is off by up to ~1.2e-6), against
    GELU in float64 (math.erf) over [−12, 12], the tails and signed zeros."""
    import math

    from fqvit_det.nn.exact import rational_gelu
    x = torch.cat([torch.linspace(-12, 12, 200001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 50.0, -50.0])])
    ref = torch.tensor([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.double().tolist()],
                       dtype=torch.float64)
    y = rational_gelu(x)
    err = (y.double() - ref).abs()
    assert float((err - (1e-6 * x.double().abs() + 1e-7)).max()) <= 0, float(err.max())
    tail = torch.tensor([0.0, 0.0, 1e-30, -1e-30, 50.0, 0.0]) * torch.tensor([1, 1, 0.5, 0.5, 1, 1])
    assert torch.equal(y[-6:], tail)
    # the same bits in a different op order would be a different function: spot-check the order
    # against torch's GELU only loosely (a different erf approximation)
    assert float((y - torch.nn.functional.gelu(x)).abs().max()) <= 2e-6


def test_exact_arithmetic_swaps_gelu_and_back():
    from fqvit_det.nn.exact import RationalGELU
    model = tiny_vit()
    spec = make_spec(method='repq', w_bits=4, a_bits=4)
    quantize_model(model, spec)
    x = images(model, 4)
    CalibrationRunner(model, spec, progress=False).run([x])
    n = sum(type(m) is nn.GELU for m in model.modules())
    assert n > 0
    set_exact_arithmetic(model)
    assert sum(type(m) is RationalGELU for m in model.modules()) == n
    assert not any(type(m) is nn.GELU for m in model.modules())
    set_exact_arithmetic(model, False)
    assert sum(type(m) is nn.GELU for m in model.modules()) == n
    assert not any(type(m) is RationalGELU for m in model.modules())
