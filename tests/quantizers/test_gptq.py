"""GPTQ weight quantizer: against a direct OBQ reference (GPTQ eq. 2–3 with explicit inverse-Hessian
updates), error reduction vs round-to-nearest, convolutions via unfold, exact stats merge, state
round trip, argument validation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqvit_det.nn.modules import QuantConv2d, QuantLinear
from fqvit_det.quantizers import build_quantizer
from fqvit_det.quantizers.gptq import GPTQWeightQuantizer
from fqvit_det.validation import QuantConfigError, check_role_cfg


def reference_gptq(W, X, bits, percdamp):
    """GPTQ eq. 2–3 written directly (float64): per output row the grid is the row's min/max
    (asymmetric, range containing 0); columns in order; after quantizing column i the remaining
    columns take −δ·[H_F⁻¹]_{i,:} with δ = (w_i − ŵ_i)/[H_F⁻¹]_ii, and H_F⁻¹ loses column i by
    the Gaussian-elimination update H⁻¹ − H⁻¹_{:,i} H⁻¹_{i,:} / H⁻¹_ii."""
    W = W.double().clone()
    X = X.double()
    K = W.shape[1]
    H = 2 * X.T @ X / X.shape[0]
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    qmax = 2 ** bits - 1
    lo = torch.minimum(W.min(1).values, torch.zeros(()))
    hi = torch.maximum(W.max(1).values, torch.zeros(()))
    scale = ((hi - lo) / qmax).clamp(min=torch.finfo(torch.float32).eps)
    zp = (-torch.round(lo / scale)).clamp(0, qmax)
    out = torch.empty_like(W)
    for i in range(K):
        q = torch.clamp(torch.round(W[:, i] / scale) + zp, 0, qmax)
        out[:, i] = (q - zp) * scale
        delta = (W[:, i] - out[:, i]) / Hinv[i, i]
        W -= delta[:, None] * Hinv[i][None, :]          # column i itself is done; only j > i matter
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return out


def correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) * 0.2 \
        + torch.randn(k, generator=g)


def calibrated(W, batches, **kw):
    q = GPTQWeightQuantizer(**{'bits': 4, **kw})
    q.bind_weight(W)
    for x in batches:
        q.observe(x)
    q.finalize()
    return q


@pytest.mark.parametrize('block_size', [128, 5])
def test_matches_direct_reference(block_size):
    torch.manual_seed(0)
    W = torch.randn(12, 20)
    X = correlated_inputs(300, 20)
    q = calibrated(W, [X[:100], X[100:]], block_size=block_size)
    ref = reference_gptq(W, X, 4, 0.01).float()
    assert torch.allclose(q.fake_quant(W), ref, atol=1e-6)
    # the codes are integers on the per-row grid
    assert q.get_params()['codes'].dtype == torch.int32


def test_reduces_output_error_vs_round_to_nearest():
    torch.manual_seed(1)
    W = torch.randn(32, 48)
    X = correlated_inputs(1000, 48, seed=1)
    rtn = GPTQWeightQuantizer(bits=4)
    rtn.bind_weight(W)
    rtn.finalize()                                        # no inputs: round to nearest
    for kw in (dict(), dict(act_order=True), dict(range_search=True), dict(symmetric=True)):
        q = calibrated(W, [X], **kw)
        err = (X @ W.T - X @ q.fake_quant(W).T).pow(2).sum()
        err_rtn = (X @ W.T - X @ rtn.fake_quant(W).T).pow(2).sum()
        assert err < 0.8 * err_rtn, kw


def _patches_reference(conv, x):
    """H = Σ over output positions of the (channel, kh, kw) patch outer products, per group, by
    explicit loops over positions (zero padding)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    G = conv.groups
    cg = x.shape[1] // G
    Ho = (xp.shape[2] - kh) // sh + 1
    Wo = (xp.shape[3] - kw) // sw + 1
    H = torch.zeros(G, cg * kh * kw, cg * kh * kw, dtype=torch.float64)
    for b in range(x.shape[0]):
        for i in range(Ho):
            for j in range(Wo):
                patch = xp[b, :, i * sh:i * sh + kh, j * sw:j * sw + kw].double()
                for g in range(G):
                    v = patch[g * cg:(g + 1) * cg].reshape(-1)
                    H[g] += torch.outer(v, v)
    return H


@pytest.mark.parametrize('groups,out_ch', [(1, 6), (2, 6), (4, 4)], ids=['dense', 'grouped', 'depthwise'])
def test_conv_hessian_via_unfold_and_error(groups, out_ch):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, out_ch, 3, stride=2, padding=1, groups=groups)
    wq = GPTQWeightQuantizer(bits=4)
    qc = QuantConv2d.from_float(conv, w_quantizer=wq)
    qc.calibrate_weight()
    rtn_w = qc.w_quantizer.fake_quant(conv.weight.detach())
    x = torch.randn(2, 4, 9, 9) + 0.5
    wq.set_mode('observe')
    with torch.no_grad():
        qc(x)
    stats = wq.calibration_stats()
    assert torch.allclose(stats['hessians'][0].double(), _patches_reference(conv, x), atol=1e-3)
    wq.finalize()
    wq.set_mode('quant')
    qc.refresh()
    with torch.no_grad():
        y = conv(x)
        err = (qc(x) - y).pow(2).sum()
        err_rtn = (F.conv2d(x, rtn_w, conv.bias, 2, 1, 1, groups) - y).pow(2).sum()
    assert err < err_rtn


def test_linear_feeds_quantized_input_rows():
    lin = nn.Linear(8, 5)
    wq = GPTQWeightQuantizer(bits=4)
    iq = build_quantizer(dict(type='UniformQuantizer', bits=4))
    iq.observe(torch.linspace(-2, 2, 50))
    iq.finalize()
    iq.set_mode('quant')
    ql = QuantLinear.from_float(lin, w_quantizer=wq, in_quantizer=iq)
    ql.calibrate_weight()
    wq.set_mode('observe')
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        ql(x)
    xq = iq.fake_quant(x).reshape(-1, 8)
    assert torch.allclose(wq.calibration_stats()['hessians'][0][0], xq.T @ xq, atol=1e-5)


def test_rank_merge_equals_single_process():
    torch.manual_seed(3)
    W = torch.randn(10, 16)
    batches = [correlated_inputs(40 + i, 16, seed=i) for i in range(5)]
    single = calibrated(W, batches)
    world = 2
    per_rank = []
    for r in range(world):
        q = GPTQWeightQuantizer(bits=4)
        for x in batches[r::world]:
            q.observe(x)
        per_rank.append(q.calibration_stats())
    merged = GPTQWeightQuantizer(bits=4)
    merged.bind_weight(W)
    merged.load_calibration_stats(merged.merge_calibration_stats(per_rank))
    assert merged.num_observed == 5
    merged.finalize()
    for k, v in single.get_params().items():
        assert torch.equal(merged.get_params()[k], v), k
    with pytest.raises(ValueError, match='round-robin'):
        merged.merge_calibration_stats([per_rank[1], per_rank[0]])


def test_params_round_trip_through_state_dict_and_set_params():
    torch.manual_seed(4)
    W = torch.randn(6, 9)
    q = calibrated(W, [correlated_inputs(50, 9)])
    fresh = GPTQWeightQuantizer(bits=4)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.fake_quant(W), q.fake_quant(W))
    other = GPTQWeightQuantizer(bits=4)
    other.set_params(**q.get_params())
    assert bool(other.calibrated) and torch.equal(other.fake_quant(W), q.fake_quant(W))
    with pytest.raises(ValueError, match='shape'):
        other.fake_quant(torch.zeros(6, 8))


@pytest.mark.parametrize('arg,value,match', [
    ('percdamp', 0, 'percdamp'), ('percdamp', 'x', 'percdamp'), ('ch_axis', 1, 'ch_axis'),
    ('block_size', 0, 'block_size'), ('act_order', 'yes', 'act_order'), ('bits', 1, 'bits'),
    ('range_search', 1, 'range_search'), ('inputs', 'fp', 'inputs')])
def test_bad_arguments_name_the_role_key(arg, value, match):
    with pytest.raises(QuantConfigError, match=r'quant_cfg\.roles\.weight.*' + match):
        check_role_cfg('weight', dict(type='GPTQWeightQuantizer', **{'bits': 4, arg: value}))
    assert check_role_cfg('det_weight', dict(type='GPTQWeightQuantizer', bits=4, act_order=True))


def test_finalize_without_bound_weight_is_a_clear_error():
    with pytest.raises(RuntimeError, match='no weight bound'):
        GPTQWeightQuantizer(bits=4).finalize()


@pytest.mark.parametrize('inputs', ['quant', 'float'])
def test_runner_compensates_every_weight_role_of_a_tiny_vit(inputs, device):
    from fqvit_det.calibration import CalibrationRunner
    from fqvit_det.convert import quantize_model
    from fqvit_det.presets import make_spec
    from fqvit_det.walk import named_quantizers
    from tests.helpers import images, tiny_vit
    g = dict(type='GPTQWeightQuantizer', bits=4, inputs=inputs)
    model = tiny_vit().to(device)
    spec = make_spec(method='repq', w_bits=4, a_bits=4,
                     roles=dict(weight=g, head_weight=g, patch_embed_weight=g))
    quantize_model(model, spec)
    x = images(model, 4, seed=2).to(device)
    result = CalibrationRunner(model, spec, progress=False).run([x[:2], x[2:]])
    gptq = [q for _, q in named_quantizers(model) if isinstance(q, GPTQWeightQuantizer)]
    assert result['gptq_layers'] == len(gptq) > 0
    assert all(q.mode == 'quant' and q.last_damping is not None for q in gptq)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_finalize_releases_the_hessians_but_keeps_the_count():
    W = torch.randn(4, 6)
    q = calibrated(W, [correlated_inputs(30, 6), correlated_inputs(30, 6, seed=1)])
    assert q.num_observed == 2
    with pytest.raises(RuntimeError, match='released'):
        q.calibration_stats()
    with pytest.raises(RuntimeError, match='released'):
        q.finalize()            # never a silent fall back to round-to-nearest
    q.reset()
    assert q.num_observed == 0
    q.finalize()                # no inputs after reset: round to nearest, by design
