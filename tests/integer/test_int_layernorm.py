"""Integer LayerNorm on PTF codes (bit-exact with the simulation) and the integer residual add
(within one code of the simulation)."""
import pytest
import torch

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.integer.layernorm import (int_layernorm_codes, int_residual_add,
                                         ptf_shifted_codes)
from fqvit_det.nn.modules import IntegerInput
from fqvit_det.presets import make_spec
from fqvit_det.quantizers import UniformQuantizer
from fqvit_det.quantizers.ptf import PTFQuantizer, int_layernorm_fake_quant

from ..helpers import images, tiny_vit


def fqvit_model(device):
    model = tiny_vit().to(device)
    spec = make_spec('fqvit', 8, 8, attn_bits=4)
    quantize_model(model, spec)
    x = images(model, 8).to(device)
    CalibrationRunner(model, spec, progress=False).run([x[:4], x[4:]])
    return model, x


def calibrated_ptf(x, device):
    q = PTFQuantizer(8, include_zero=False).to(device)
    q.set_mode('observe')
    q(x)
    q.finalize()
    q.set_mode('quant')
    return q


def test_ptf_shifted_codes_match_the_quantizer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g) * torch.logspace(-2, 1, 16)
    q = calibrated_ptf(x, 'cpu')
    assert int(q.alpha.max()) > 0
    ours = ptf_shifted_codes(q.quantize(x), q.zero_point, q.alpha)
    assert torch.equal(ours, q.shifted_codes(x))


@pytest.mark.parametrize('negative_gamma', [False, True])
def test_int_layernorm_codes_bit_exact_synthetic(device, negative_gamma):
    g = torch.Generator().manual_seed(1)
    C = 48
    x = (torch.randn(4, 9, C, generator=g) * torch.logspace(-1, 1.5, C) + 0.3).to(device)
    iq = calibrated_ptf(x, device)
    oq = UniformQuantizer(8, include_zero=False).to(device)
    oq.set_params(scale=torch.tensor(0.021), zero_point=torch.tensor(117.0))
    oq.set_mode('quant')
    w = torch.randn(C, generator=g).to(device)
    w = -w.abs() if negative_gamma else w
    b = torch.randn(C, generator=g).to(device)
    xq = iq(x)
    sim = int_layernorm_fake_quant(xq, IntegerInput(iq), w, b, oq)
    codes = int_layernorm_codes(iq.quantize(xq), iq, w, b, oq)
    assert codes.dtype == torch.int32
    assert torch.equal(oq.dequantize(codes), sim)
    assert torch.equal(codes, oq.quantize(sim))


def test_int_layernorm_codes_bit_exact_in_a_calibrated_fqvit(device):
    model, x = fqvit_model(device)
    norms = [m for m in model.modules() if type(m).__name__ == 'QuantLayerNorm']
    seen = {}
    hooks = [n.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n in norms]
    with torch.no_grad():
        model(x[:4])
    for h in hooks:
        h.remove()
    assert len(seen) == len(norms) == 5                   # 2 blocks × 2 + the final norm
    for norm, (inp, out) in seen.items():
        pair = norm._integer_pair()
        assert pair is not None                           # integer mode ran in the simulation
        src, oq = pair[0].quantizer, pair[1]
        codes = int_layernorm_codes(src.quantize(inp), src, norm.weight, norm.bias, oq,
                                    eps=norm.eps)
        assert torch.equal(oq.dequantize(codes), out)


def test_int_residual_add_within_one_code_of_the_simulation(device):
    g = torch.Generator().manual_seed(2)
    C = 40
    res = (torch.randn(4, 50, C, generator=g) * torch.logspace(-1, 1, C)).to(device)
    rq = calibrated_ptf(res, device)
    bq = UniformQuantizer(8, include_zero=False).to(device)
    y = (torch.randn(4, 50, C, generator=g) * 0.7).to(device)
    bq.set_mode('observe')
    bq(y)
    bq.finalize()
    bq.set_mode('quant')
    total = rq(res) + bq(y)
    oq = calibrated_ptf(total, device)
    sim = oq.quantize(oq(total))
    codes = int_residual_add(rq.quantize(res), rq, bq.quantize(y), bq, oq)
    diff = (codes - sim).abs()
    assert codes.dtype == torch.int32
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.005
    float_codes = int_residual_add(rq.quantize(res), rq, bq.quantize(y), bq, oq, method='float')
    assert int((float_codes - sim).abs().max()) <= 1


def test_int_residual_add_in_a_calibrated_fqvit(device):
    model, x = fqvit_model(device)
    blk = model.blocks[1]
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda m, i: seen.__setitem__('x', i[0])),
             blk.attn.register_forward_hook(lambda m, i, o: seen.__setitem__('attn', o)),
             blk.attn_residual_quantizer.register_forward_hook(
                 lambda m, i, o: seen.__setitem__('sum', o))]
    with torch.no_grad():
        model(x[:4])
    for h in hooks:
        h.remove()
    rq = model.blocks[0].mlp_residual_quantizer            # block 1's input codes
    aq = blk.attn.proj.out_quantizer                       # attn_output
    oq = blk.attn_residual_quantizer
    codes = int_residual_add(rq.quantize(seen['x']), rq, aq.quantize(seen['attn']), aq, oq)
    diff = (codes - oq.quantize(seen['sum'])).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.005


def test_int_layernorm_codes_rejects_other_quantizers():
    q = UniformQuantizer(8, symmetric=True)
    with pytest.raises(TypeError, match='PTFQuantizer'):
        int_layernorm_codes(torch.zeros(2, 4, dtype=torch.int32), q, None, None,
                            UniformQuantizer(8))


def test_int_residual_add_chunked_equals_requantize():
    from fqvit_det.integer.attention import requantize
    g = torch.Generator().manual_seed(4)
    C = 24
    rq = calibrated_ptf(torch.randn(3, 30, C, generator=g) * torch.logspace(-1, 1, C), 'cpu')
    bq = UniformQuantizer(8, include_zero=False)
    bq.set_params(scale=torch.tensor(0.013), zero_point=torch.tensor(141.0))
    oq = calibrated_ptf(torch.randn(3, 30, C, generator=g) * torch.logspace(-1, 1.2, C), 'cpu')
    a = torch.randint(0, 256, (3, 30, C), generator=g)
    b = torch.randint(0, 256, (3, 30, C), generator=g)
    ours = int_residual_add(a, rq, b, bq, oq)
    ref = requantize([a - rq.zero_point.long(), b - 141],
                     [rq.channel_scale.double() / oq.channel_scale.double(),
                      bq.scale.double() / oq.channel_scale.double()],
                     oq.zero_point, 0, 255, bound=510)
    assert torch.equal(ours, ref)
