"""ONNX export (fqvit_det.export.onnx, tools/export_onnx.py) run through onnxruntime.

Tolerances: with onnxruntime's graph optimizations off, the exported graph computes the simulated
model's quantizers with the same rounding (QuantizeLinear and Round round half to even, like
``torch.round``; QuantizeLinear divides by the scale like our quantizers), so a quantizer on its
own is bit-exact and the whole FQ-ViT model (every MatMul input on a grid, integer LayerNorm in
exact float64 integers, Log-Int-Softmax in exact integers) came out bit-exact here; we assert
≤ 1e-5. For the other methods float LayerNorm / Softmax / MatMul kernels sum in another order and
the log-coded quantizers take Log instead of torch's float32 log2, so a value within ~1 ulp of a
rounding tie can land one code apart: identical top-1 and max |logit diff| ≤ 1e-2 on these tiny
models (measured ≤ 4e-7 here). With optimizations on, onnxruntime fuses the QDQ pairs into
integer kernels that requantize with their own rounding: identical top-1, max diff ≤ 0.1.
"""
import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.export import UnsupportedQuantizerError, check_exportable, export_onnx
from fqvit_det.export.onnx import uniform_plan
from fqvit_det.nn.exact import set_exact_arithmetic
from fqvit_det.presets import make_spec
from fqvit_det.quantizers import build_quantizer
from fqvit_det.quantizers.base import Quantizer
from fqvit_det.quantizers.lis import LogIntSoftmax

from .helpers import images, tiny_vit
from .tiny_cls import load_tool, make_images, write_config

PRESETS = {
    'fqvit_w8a8': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=8, lis=False),
    'fqvit_w4a4_lis': dict(method='fqvit', w_bits=4, a_bits=4, attn_bits=4),
    # the layer searches only choose parameters; the export reads the calibrated ones
    'ptq4vit_w6a6': dict(method='ptq4vit', w_bits=6, a_bits=6, search=None),
    'repq_w4a4': dict(method='repq', w_bits=4, a_bits=4),
    # AdaLog probabilities and per-head q / k / v (as the AdaLog preset; its post-GELU Δ search
    # is slow to calibrate, the export is the same code)
    'adalog_probs_perhead_qkv': dict(method='repq', w_bits=4, a_bits=4, roles=dict(
        attn_probs=dict(type='AdaLogQuantizer', bits=4),
        q=dict(type='UniformQuantizer', bits=4, ch_axis=1),
        k=dict(type='UniformQuantizer', bits=4, ch_axis=1),
        v=dict(type='UniformQuantizer', bits=4, ch_axis=1))),
}
EXACT = ('fqvit_w8a8', 'fqvit_w4a4_lis')


def session(path, optimize: bool, optimized_path=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=['CPUExecutionProvider'])


def run(sess, x):
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def calibrated(name):
    model = tiny_vit()
    spec = make_spec(**PRESETS[name])
    quantize_model(model, spec)
    x = images(model, 8)
    CalibrationRunner(model, spec, progress=False).run([x[:4], x[4:]])
    return model


def op_types(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize('name', list(PRESETS))
def test_tiny_vit_export_matches_simulation(name, tmp_path):
    model = calibrated(name)
    x = images(model, 6, seed=5)
    with torch.no_grad():
        ref = model(x).numpy()
    path = tmp_path / f'{name}.onnx'
    report = export_onnx(model, x[:2], path)
    # the model itself is unchanged by the export
    with torch.no_grad():
        assert np.array_equal(model(x).numpy(), ref)
    out = run(session(path, optimize=False), x)          # batch 6: the batch axis is dynamic
    diff = float(np.abs(out - ref).max())
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert diff <= (1e-5 if name in EXACT else 1e-2), diff
    opt = tmp_path / 'opt.onnx'
    out_opt = run(session(path, optimize=True, optimized_path=opt), x)
    assert (out_opt.argmax(1) == ref.argmax(1)).all()
    assert float(np.abs(out_opt - ref).max()) <= 0.1
    # QDQ present: activations as QuantizeLinear→DequantizeLinear, every weight an int8 initializer
    ops = op_types(path)
    assert ops.count('QuantizeLinear') >= 1 and ops.count('DequantizeLinear') > ops.count('QuantizeLinear')
    assert all(form.startswith('DQ int8') for form in report.weights.values()), report.weights
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == 'Constant'}
    w_inputs = [n.input[0] for n in graph.node if n.op_type == 'DequantizeLinear'
                and (n.input[0] in inits or n.input[0] in consts)]
    dtypes = {(inits.get(i) or consts.get(i)).data_type for i in w_inputs}
    assert len(w_inputs) == len(report.weights) and dtypes == {onnx.TensorProto.INT8}
    # onnxruntime fuses QDQ MatMuls into integer kernels
    fused = set(op_types(opt)) & {'QLinearMatMul', 'MatMulIntegerToFloat', 'QLinearConv'}
    assert fused, sorted(set(op_types(opt)))


@pytest.mark.parametrize('name', list(PRESETS))
def test_tiny_vit_exact_export_matches_the_exact_simulation(name, tmp_path):
    """arithmetic='exact': every Linear on a per-tensor uniform input is MatMulInteger on the codes
    followed by Cast, Mul Δ_x·Δ_w, Add bias (twin-uniform inputs: a float64 MatMul on the codes),
    QKᵀ and P·V on codes; onnxruntime reproduces the integer-exact simulation, with graph
    optimizations on too (the integer GEMMs and the separate rescale are kept)."""
    model = calibrated(name)
    x = images(model, 6, seed=5)
    with torch.no_grad():
        ref_float = model(x).numpy()
    exact = copy.deepcopy(model)
    set_exact_arithmetic(exact)
    with torch.no_grad():
        ref = exact(x).numpy()
    path = tmp_path / f'{name}.onnx'
    report = export_onnx(model, x[:2], path, arithmetic='exact')
    with torch.no_grad():                 # the model computes as before (exact arithmetic off)
        assert np.array_equal(model(x).numpy(), ref_float)
    forms = list(report.weights.values())
    n_twin = sum(f.startswith('integer (two MatMulInteger') for f in forms)
    n_int = sum(f.startswith('integer (MatMulInteger') for f in forms) + 2 * n_twin
    assert sum(f.startswith('integer') for f in forms) >= len(forms) - 1, report.weights
    assert n_twin == (2 if name.startswith('ptq4vit') else 0)     # fc2 after the twin GELU grid
    # PTQ4ViT's patch embedding reads the float image: a float64 MatMul (order-independent)
    assert forms.count('float64 MatMul (float input, dequantized weight)') == \
        (1 if name.startswith('ptq4vit') else 0), report.weights
    assert op_types(path).count('MatMulInteger') == n_int
    opt = tmp_path / 'opt.onnx'
    for optimize in (False, True):
        out = run(session(path, optimize, opt if optimize else None), x)
        assert (out.argmax(1) == ref.argmax(1)).all()
        assert float(np.abs(out - ref).max()) <= (1e-5 if name in EXACT else 1e-2), name
    ops = op_types(opt)
    assert ops.count('MatMulInteger') == n_int and 'MatMulIntegerToFloat' not in ops


def test_exact_export_rejects_an_unknown_arithmetic(tmp_path):
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        export_onnx(torch.nn.Sequential(torch.nn.Identity()), torch.zeros(1, 4),
                    tmp_path / 'x.onnx', arithmetic='integer')
    assert not (tmp_path / 'x.onnx').exists()


def test_uniform_qdq_rounds_like_our_quantizer(tmp_path):
    """Ties, clamping and out-of-range zero points: bit-exact against fake_quant."""
    cases = [
        dict(bits=4, symmetric=False, clamp_zero_point=False, include_zero=False),   # RepQ-style
        dict(bits=6, symmetric=True),
        dict(bits=8, symmetric=False),
        dict(bits=4, symmetric=False, ch_axis=-1),                                   # float ops
    ]
    for i, kw in enumerate(cases):
        q = build_quantizer(dict(type='UniformQuantizer', **kw))
        q.set_mode('observe')
        q(torch.linspace(0.3, 2.0, 64).reshape(4, 16) * torch.linspace(1, 2, 16))
        q.finalize()
        q.set_mode('quant')
        s = q.scale.reshape(-1)[0]
        ties = (torch.arange(-40, 80, dtype=torch.float32) + 0.5) * s     # exact half steps
        x = torch.cat([ties, torch.randn(200) * 3]).reshape(-1, 16)
        wrapper = torch.nn.Sequential(q)
        path = tmp_path / f'u{i}.onnx'
        export_onnx(wrapper, x[:2], path)
        out = run(session(path, optimize=False), x)
        assert np.array_equal(out, q.fake_quant(x).numpy()), kw


def test_uniform_plan_containers():
    # 4-bit, zero point −3 (outside [0, 15]): uint8 container, clipped to the grid
    plan = uniform_plan(torch.tensor(0.1), torch.tensor(-3.0), 0, 15)
    assert plan.zero_point.dtype == torch.uint8 and plan.clip
    # signed symmetric 8-bit activations: uint8 with zero point 128, no clip
    plan = uniform_plan(torch.tensor(0.1), torch.tensor(0.0), -128, 127)
    assert plan.zero_point.dtype == torch.uint8 and int(plan.zero_point) == 128 and not plan.clip
    # weights: int8 with zero point 0 (symmetric S8 for the integer kernels)
    plan = uniform_plan(torch.tensor([0.1, 0.2]), torch.tensor([3.0, 5.0]), 0, 15, 0, weights=True)
    assert plan.zero_point.dtype == torch.int8 and plan.zero_point.tolist() == [0, 0]
    # 8-bit grid with a zero point outside [0, 255] fits no 8-bit container: float ops
    plan = uniform_plan(torch.tensor(0.1), torch.tensor(-7.0), 0, 255)
    assert plan.zero_point is None


def test_log_int_softmax_is_bit_exact(tmp_path):
    lis = LogIntSoftmax(bits=4)
    logits = torch.randn(2, 3, 17, 17) * 4
    lis.set_mode('observe')
    lis(logits)
    lis.finalize()
    lis.set_mode('quant')
    path = tmp_path / 'lis.onnx'
    export_onnx(torch.nn.Sequential(lis), logits[:1], path)
    x = torch.randn(3, 3, 17, 17) * 5
    assert np.array_equal(run(session(path, optimize=False), x), lis.fake_quant(x).numpy())


class _Unexportable(Quantizer):
    def fake_quant(self, x):
        return x


def test_unsupported_and_uncalibrated_quantizers_are_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Identity())
    model.add_module('odd', _Unexportable())
    model.odd.mark_calibrated()
    model.odd.set_mode('quant')
    with pytest.raises(UnsupportedQuantizerError, match=r'odd: quantizer type _Unexportable has no ONNX'):
        export_onnx(model, torch.zeros(1, 4), tmp_path / 'x.onnx')
    assert not (tmp_path / 'x.onnx').exists()
    model.odd.mode = 'observe'
    with pytest.raises(UnsupportedQuantizerError, match='still in observe mode'):
        check_exportable(model)


def _cli(args):
    return load_tool('export_onnx').main([str(a) for a in args])


def test_cli_calibrates_saves_state_exports_and_reexports_from_state(tmp_path, capsys):
    data = make_images(str(tmp_path / 'data'))
    cfg = write_config(tmp_path / 'cfg.py', data)
    state, first, second = tmp_path / 'st.safetensors', tmp_path / 'a.onnx', tmp_path / 'b.onnx'
    _cli([cfg, '--out', first, '--save-state', state, '--verify'])
    out = capsys.readouterr().out
    assert 'QDQ uint8 per-tensor' in out and 'same top-1: True' in out
    report = _cli([cfg, '--out', second, '--quant-state', state])
    assert report.op_counts['QuantizeLinear'] > 0
    x = torch.randn(3, 3, 32, 32)
    assert np.array_equal(run(session(first, False), x), run(session(second, False), x))
    capsys.readouterr()
    report = _cli([cfg, '--out', tmp_path / 'c.onnx', '--quant-state', state, '--arithmetic', 'exact',
                   '--verify'])
    out = capsys.readouterr().out
    assert report.op_counts.get('MatMulInteger', 0) > 0 and 'MatMulInteger' in out
    assert out.count('simulated (exact)') == 2 and 'same top-1: False' not in out


@pytest.mark.parametrize('args, message', [
    (['--quant-state', 'missing.safetensors'], "--quant-state 'missing.safetensors' not found"),
    (['--opset', '11'], '--opset must be >= 13'),
    (['--quant-state', '{state}', '--save-state', 'x.safetensors'], 'cannot be combined'),
    (['--out', '{tmp}/no/such/dir/m.onnx'], 'does not exist'),
])
def test_cli_rejects_bad_input_before_building(args, message, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / 'cfg.py', str(tmp_path / 'data'))    # no data needed to fail
    (tmp_path / 'st.safetensors').write_bytes(b'')
    args = [a.replace('{state}', str(tmp_path / 'st.safetensors')).replace('{tmp}', str(tmp_path))
            for a in args]
    built = []
    monkeypatch.setattr('fqvit_det.mm.cls.QuantizedClassifier.__init__',
                        lambda *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(SystemExit, match=re.escape(message)):
        _cli([cfg, '--out', tmp_path / 'm.onnx', *args] if '--out' not in args else [cfg, *args])
    assert not built                                # failed before any model was built


def test_cli_rejects_a_state_of_another_recipe(tmp_path):
    data = make_images(str(tmp_path / 'data'))
    cfg = write_config(tmp_path / 'cfg.py', data)
    other = write_config(tmp_path / 'other.py', data,
                         quant_cfg=dict(method='repq', w_bits=4, a_bits=4, calib_images=4))
    state = tmp_path / 'st.safetensors'
    _cli([other, '--out', tmp_path / 'a.onnx', '--save-state', state])
    with pytest.raises(ValueError, match='different recipe'):
        _cli([cfg, '--out', tmp_path / 'b.onnx', '--quant-state', state])
    assert not (tmp_path / 'b.onnx').exists()


@pytest.mark.parametrize('cfg', [
    dict(type='TwinUniformGeluQuantizer', bits=6),
    dict(type='TwinUniformSoftmaxQuantizer', bits=6),
    dict(type='Log2Quantizer', bits=4),
    dict(type='LogSqrt2Quantizer', bits=4),
    dict(type='LogSqrt2Quantizer', bits=6),
    dict(type='AdaLogQuantizer', bits=4, shift=0.16997124, max_samples=4096),
])
def test_non_uniform_quantizers_as_standard_ops(cfg, tmp_path):
    """Bit-exact: twin uniform by construction; log-coded ones because the approximate code from
    onnxruntime's Log is corrected with the code's exact float32 thresholds (inputs placed at and
    beside every threshold included)."""
    q = build_quantizer(cfg)
    g = torch.Generator().manual_seed(0)
    if 'Gelu' in cfg['type'] or 'shift' in cfg:
        x = torch.nn.functional.gelu(torch.randn(64, 64, generator=g) * 2)
    else:
        x = torch.softmax(torch.randn(64, 64, generator=g) * 3, dim=-1)
    q.set_mode('observe')
    q(x)
    q.finalize()
    q.set_mode('quant')
    path = tmp_path / 'q.onnx'
    report = export_onnx(torch.nn.Sequential(q), x[:2], path)
    assert 'standard ops' in next(iter(report.quantizers.values()))
    if 'Log' in cfg['type'] or 'shift' in cfg:
        # the inputs whose code changes: every threshold u = x/Δ and its float32 neighbours
        from fqvit_det.export.onnx import log_code_thresholds
        from fqvit_det.quantizers.log import log_sqrt2_quantize, log2_quantize
        d = q.delta.detach()
        code_of = ((lambda u: torch.round(-2.0 * torch.log2(u))) if 'Sqrt2' in cfg['type'] else
                   (lambda u: torch.round(-torch.log2(u))) if cfg['type'] == 'Log2Quantizer' else
                   (lambda u: torch.round(-torch.log2(u) * float(q.r) / float(int(q.q)))))
        t = log_code_thresholds(code_of, q.bits)
        near = torch.cat([t, torch.nextafter(t, torch.zeros(())), torch.nextafter(t, t * 2)]) * d
        shift = float(getattr(q, 'shift', 0.0) or 0.0)
        near = torch.cat([near - shift, torch.zeros(64 - near.numel() % 64)])
        x = torch.cat([x.reshape(-1), near]).reshape(-1, 64)
        if 'Sqrt2' in cfg['type']:
            assert torch.equal(q.quantize(t * d), log_sqrt2_quantize(t * d, d, q.bits))
        if cfg['type'] == 'Log2Quantizer':
            assert torch.equal(q.quantize(t * d), log2_quantize(t * d, d, q.bits))
    for optimize in (False, True):
        out, ref = run(session(path, optimize=optimize), x), q.fake_quant(x).numpy()
        assert np.array_equal(out, ref), (cfg, int((out != ref).sum()))
