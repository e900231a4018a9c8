"""Every preset on small timm ViT / Swin: complete conversion, calibration, fidelity, saved state."""
import pytest
import torch
from torch import nn

from fqvit_det.calibration import CalibrationRunner, named_quantizers, set_quant_mode
from fqvit_det.convert import quantize_model
from fqvit_det.convert.timm_swin import QuantTimmWindowAttention
from fqvit_det.convert.timm_vit import QuantTimmAttention
from fqvit_det.nn.modules import QuantConv2d, QuantLayerNorm, QuantLinear
from fqvit_det.presets import make_spec
from fqvit_det.state import load_quant_state, save_quant_state

from .helpers import images, tiny_swin, tiny_vit

FAST_SEARCH = dict(images=2, rounds=1, eq_n=16, levels=2, top_k=4, max_rows=256)
PRESETS = {
    'fqvit_888': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=8, lis=False),
    'fqvit_884': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4),
    'ptq4vit_w8a8': dict(method='ptq4vit', w_bits=8, a_bits=8, search_cfg=FAST_SEARCH),
    'repq_w8a8': dict(method='repq', w_bits=8, a_bits=8),
    'adalog_w8a8': dict(method='adalog', w_bits=8, a_bits=8, search_cfg=FAST_SEARCH),
}
MODELS = {'vit': (tiny_vit, QuantTimmAttention), 'swin': (tiny_swin, QuantTimmWindowAttention)}


def sqnr_db(ref, out):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def build(arch, preset):
    factory, attn_cls = MODELS[arch]
    model = factory()
    x = images(model, 4)
    with torch.no_grad():
        ref = model(x)
    spec = make_spec(**PRESETS[preset])
    quantize_model(model, spec)
    return model, spec, x, ref, attn_cls


def assert_complete(model, attn_cls):
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear or type(mod) is nn.Conv2d:
            pytest.fail(f'{name} is still a float {type(mod).__name__}')
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            assert mod.w_quantizer is not None, f'{name}: weight not quantized'
        if name.endswith('.attn'):
            assert type(mod) is attn_cls and hasattr(mod, 'aq'), f'{name}: attention not converted'
            qkv_out = mod.qkv.out_quantizer  # FQ-ViT: q, k, v as one tensor
            assert (qkv_out is not None) != (mod.aq.q is not None), f'{name}: q/k/v quantized twice or never'
            assert (mod.aq.q is None) == (mod.aq.k is None) == (mod.aq.v is None)
            assert mod.aq.probs is not None
        if name.endswith(('.norm1', '.norm2')):
            assert isinstance(mod, QuantLayerNorm) and mod.out_quantizer is not None


@pytest.mark.parametrize('arch', MODELS)
@pytest.mark.parametrize('preset', PRESETS)
def test_preset_end_to_end(arch, preset, tmp_path):
    model, spec, x, ref, attn_cls = build(arch, preset)
    assert_complete(model, attn_cls)
    CalibrationRunner(model, spec, progress=False).run([x[:2], x[2:]])
    assert all(q.mode == 'quant' for _, q in named_quantizers(model))
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    # 8-bit weights/activations on random-init models: the logits stay close to float. FQ-ViT's
    # uniform 8-bit softmax keeps the observed range with a clamped zero point (the official
    # convention), which clips max(P) by min(P): in the tiny Swin's small last-stage windows min(P)
    # is large (measured 20.3 dB; 28.8 with the range widened to 0).
    floor = 18 if (arch, preset) == ('swin', 'fqvit_888') else 25
    assert sqnr_db(ref, out) > floor, f'{arch}/{preset}: SQNR {sqnr_db(ref, out):.1f} dB'

    # Saved state reloads into a freshly converted model with bit-identical outputs.
    path = save_quant_state(model, str(tmp_path / 'state.safetensors'), spec)
    fresh, spec2, _, _, _ = build(arch, preset)
    load_quant_state(fresh, path, spec2)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_lower_bits_lose_more():
    errs = {}
    for bits in (8, 4):
        model = tiny_vit()
        x = images(model, 4)
        with torch.no_grad():
            ref = model(x)
        spec = make_spec('repq', bits, bits)
        quantize_model(model, spec)
        CalibrationRunner(model, spec, progress=False).run([x])
        with torch.no_grad():
            errs[bits] = sqnr_db(ref, model(x))
    assert errs[8] > errs[4] + 6


def test_float_mode_is_exactly_float():
    model, spec, x, ref, _ = build('swin', 'fqvit_884')
    CalibrationRunner(model, spec, progress=False).run([x])
    set_quant_mode(model, 'float')
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_state_mismatch_is_a_clear_error(tmp_path):
    model, spec, x, _, _ = build('vit', 'repq_w8a8')
    CalibrationRunner(model, spec, progress=False).run([x])
    path = save_quant_state(model, str(tmp_path / 's.safetensors'), spec)
    other, spec_other, _, _, _ = build('vit', 'fqvit_884')
    with pytest.raises(ValueError, match='calibrated with'):
        load_quant_state(other, path, spec_other)
    # A state of another architecture: refused with the file named, before anything is loaded.
    vit, vit_spec, x, _, _ = build('vit', 'fqvit_888')
    CalibrationRunner(vit, vit_spec, progress=False).run([x])
    vit_path = save_quant_state(vit, str(tmp_path / 'vit.safetensors'), vit_spec)
    swin, swin_spec, _, _, _ = build('swin', 'fqvit_888')
    with pytest.raises(ValueError, match='vit.safetensors'):
        load_quant_state(swin, vit_path, swin_spec)


def test_nan_in_calibration_names_the_tensor():
    model, spec, x, _, _ = build('vit', 'fqvit_888')
    x = x.clone()
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='patch_embed'):
        CalibrationRunner(model, spec, progress=False).run([x])


# --- FQ-ViT's residual stream and output roles (official vit_quant.py / swin_quant.py) ---------

def _calibrated(arch, preset, device=None, batches=2):
    model, spec, x, ref, _ = build(arch, preset)
    if device is not None:
        model, x = model.to(device), x.to(device)
    CalibrationRunner(model, spec, progress=False).run([x[2 * i:2 * i + 2] for i in range(batches)])
    return model, spec, x


def _capture(model, specs):
    """Register hooks; ``specs``: name -> (module, 'in' | 'out'). Returns (store, handles)."""
    store, handles = {}, []
    for name, (mod, where) in specs.items():
        if where == 'in':
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: store.__setitem__(name, args[0].detach().clone())))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, name=name: store.__setitem__(name, out.detach().clone())))
    return store, handles


def test_fqvit_quantizer_set_matches_official_vit():
    """Per block the official code quantizes 15 tensors with 8-bit softmax (qkv/proj/fc1/fc2
    weights, norm1/norm2 outputs, qkv output, logits, probabilities, P·V output, proj output,
    post-GELU, fc2 output and the two residual sums) plus 9 outside the blocks (input image,
    patch-embedding weight and output, tokens, position embedding, embedding sum, head input,
    head weight, logits). LIS folds the logits quantizer into the softmax: 14 per block."""
    for preset, per_block in (('fqvit_888', 15), ('fqvit_884', 14)):
        model, _, _, _, _ = build('vit', preset)
        names = [n for n, _ in named_quantizers(model)]
        assert len(names) == 2 * per_block + 9, (preset, names)
        assert {'residual_quantizer', 'embed_tokens_quantizer', 'pos_embed_quantizer',
                'patch_embed.proj.out_quantizer', 'head.out_quantizer', 'blocks.1.attn.qkv.out_quantizer',
                'blocks.1.attn.proj.out_quantizer', 'blocks.1.mlp.fc2.out_quantizer',
                'blocks.1.attn_residual_quantizer', 'blocks.1.mlp_residual_quantizer'} <= set(names)
        assert not any(n.endswith(('aq.q', 'aq.k', 'aq.v')) or 'norm1.in_quantizer' in n for n in names)


def test_residual_sum_feeds_both_the_add_and_the_norm():
    model, _, x = _calibrated('vit', 'fqvit_884')
    b0, b1 = model.blocks
    specs = {'embed': (model.residual_quantizer, 'out'), 'b0_norm1': (b0.norm1, 'in'),
             'b0_attn_res': (b0.attn_residual_quantizer, 'out'), 'b0_norm2': (b0.norm2, 'in'),
             'b0_mlp': (b0.mlp, 'out'), 'b0_mlp_res_in': (b0.mlp_residual_quantizer, 'in'),
             'b0_mlp_res': (b0.mlp_residual_quantizer, 'out'), 'b1_norm1': (b1.norm1, 'in'),
             'b1_attn': (b1.attn, 'out'), 'b1_attn_res_in': (b1.attn_residual_quantizer, 'in'),
             'b1_mlp_res': (b1.mlp_residual_quantizer, 'out'), 'norm': (model.norm, 'in')}
    store, handles = _capture(model, specs)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    # The norms read exactly the quantized sums ...
    assert torch.equal(store['b0_norm1'], store['embed'])
    assert torch.equal(store['b0_norm2'], store['b0_attn_res'])
    assert torch.equal(store['b1_norm1'], store['b0_mlp_res'])
    assert torch.equal(store['norm'], store['b1_mlp_res'])
    # ... and the next residual add uses the same tensors.
    assert torch.equal(store['b0_mlp_res_in'], store['b0_attn_res'] + store['b0_mlp'])
    assert torch.equal(store['b1_attn_res_in'], store['b0_mlp_res'] + store['b1_attn'])
    # The sums are on the PTF grid: quantizing them again changes nothing.
    q = b0.attn_residual_quantizer
    assert torch.equal(q.fake_quant(store['b0_attn_res']), store['b0_attn_res'])
    # Quantize once: the norms own no input quantizer; they point at the residual quantizers.
    assert b0.norm1.in_quantizer is None and b0.norm1.input_source is model.residual_quantizer
    assert b1.norm1.input_source is b0.mlp_residual_quantizer
    assert model.norm.input_source is b1.mlp_residual_quantizer
    assert model.norm.output_target is model.head.in_quantizer


def test_each_residual_quantizer_observes_once_per_batch():
    model, spec, x, _, _ = build('vit', 'fqvit_884')
    residuals = [model.residual_quantizer] + [q for b in model.blocks
                                              for q in (b.attn_residual_quantizer, b.mlp_residual_quantizer)]
    calls = {id(q): 0 for q in residuals}

    def count(mod, args):
        if mod.mode == 'observe':
            calls[id(mod)] += 1
    handles = [q.register_forward_pre_hook(count) for q in residuals]
    CalibrationRunner(model, spec, progress=False).run([x[:1], x[1:2], x[2:]])
    for h in handles:
        h.remove()
    assert set(calls.values()) == {3}
    assert all(q.calibrated for q in residuals)


@pytest.mark.parametrize('arch, norm_path, source_path, expand', [
    ('vit', 'blocks.1.norm1', 'blocks.0.mlp_residual_quantizer', None),
    ('vit', 'blocks.0.norm2', 'blocks.0.attn_residual_quantizer', None),
    ('swin', 'layers.1.blocks.0.norm2', 'layers.1.blocks.0.attn_residual_quantizer', None),
    ('swin', 'layers.2.downsample.norm', 'layers.1.blocks.0.mlp_residual_quantizer', 4),
])
def test_integer_layernorm_consumes_residual_ptf_codes(arch, norm_path, source_path, expand):
    from fqvit_det.quantizers.ptf import PTFQuantizer, int_layernorm_reference
    model, _, x = _calibrated(arch, 'fqvit_884')
    norm, ptf = model.get_submodule(norm_path), model.get_submodule(source_path)
    assert isinstance(ptf, PTFQuantizer) and norm.input_source is ptf and norm.in_quantizer is None
    store, handles = _capture(model, {'in': (norm, 'in'), 'out': (norm, 'out')})
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    xin = store['in']
    # Expected codes written from the PTF parameters directly: (q − z)·2^α_c per channel; a
    # patch-merging norm sees the 4 neighbours concatenated (timm: channel k·C + c).
    alpha = ptf.alpha if expand is None else ptf.alpha.repeat(expand)
    scale = ptf.base_scale * 2.0 ** alpha.float()
    q = torch.clamp(torch.round(xin / scale) + ptf.zero_point, 0, ptf.qmax) - ptf.zero_point
    assert torch.equal(q * scale, xin), 'the norm input is not on the residual quantizer grid'
    codes = (q * 2.0 ** alpha.float()).to(torch.int32)
    oq = norm.out_quantizer
    want = oq.dequantize(int_layernorm_reference(codes, ptf.base_scale, norm.weight, norm.bias, oq.scale,
                                                 oq.zero_point, out_bits=oq.bits, eps=norm.eps))
    torch.testing.assert_close(store['out'], want, rtol=0, atol=0)


def test_vit_final_norm_writes_on_the_head_input_grid():
    model, _, x = _calibrated('vit', 'fqvit_884')
    store, handles = _capture(model, {'out': (model.norm, 'out')})
    with torch.no_grad():
        model(x)
    handles[0].remove()
    cls = store['out'][:, 0]
    assert torch.equal(model.head.in_quantizer.fake_quant(cls), cls)


@pytest.mark.parametrize('roles', [
    dict(ln_output=dict(type='AdaLogQuantizer', bits=8)),                          # PTF residual
    dict(residual=None, ln_input=dict(type='PTFQuantizer', bits=8),                # PTF ln_input
         ln_output=dict(type='TwinUniformGeluQuantizer', bits=8)),
])
def test_ptf_with_non_uniform_norm_output_runs_float_layernorm(roles):
    model = tiny_vit()
    x = images(model, 4)
    spec = make_spec('fqvit', 8, 8, 8, lis=False, roles=roles)
    quantize_model(model, spec)
    CalibrationRunner(model, spec, progress=False).run([x])
    norm = model.blocks[0].norm2
    store, handles = _capture(model, {'in': (norm, 'in'), 'out': (norm, 'out')})
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    assert torch.isfinite(out).all()
    xin = store['in'] if norm.in_quantizer is None else norm.in_quantizer.fake_quant(store['in'])
    want = norm.out_quantizer.fake_quant(torch.nn.functional.layer_norm(
        xin, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
    torch.testing.assert_close(store['out'], want, rtol=0, atol=0)


def test_ln_input_and_residual_together_is_an_error():
    model = tiny_vit()
    spec = make_spec('fqvit', roles=dict(ln_input=dict(type='UniformQuantizer', bits=8)))
    with pytest.raises(ValueError, match=r'blocks\.0\.norm1.*ln_input=None'):
        quantize_model(model, spec)


def test_rule_matching_nothing_is_an_error_unless_optional():
    from fqvit_det.convert import Rule
    from fqvit_det.convert.timm_vit import vit_rules
    spec = make_spec('repq', 8, 8)
    with pytest.raises(ValueError, match=r"'blocks\.\*\.mlp\.fc3' \(linear\)"):
        quantize_model(tiny_vit(), spec, rules=vit_rules() + [Rule('blocks.*.mlp.fc3', 'linear', dict(weight='weight'))])
    converted = quantize_model(tiny_vit(), spec, rules=vit_rules() + [
        Rule('blocks.*.mlp.fc3', 'linear', dict(weight='weight'), optional=True)])
    assert 'blocks.0.mlp.fc2' in converted
    # timm ViT: ``norm`` and ``fc_norm`` are alternatives; an average-pooled ViT converts too.
    import timm
    pooled = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, img_size=32,
                               num_classes=10, global_pool='avg', fc_norm=True).eval()
    assert 'fc_norm' in quantize_model(pooled, spec)


def test_convert_does_not_import_timm():
    import subprocess
    import sys
    code = ('import sys, fqvit_det.convert, fqvit_det.nn, fqvit_det.presets; '
            'assert "timm" not in sys.modules, "timm imported"')
    subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('arch', MODELS)
def test_quantizers_are_created_on_the_model_device(arch, device):
    factory, _ = MODELS[arch]
    model = factory().to(device)
    quantize_model(model, make_spec('fqvit', 8, 8, 4))
    for name, q in named_quantizers(model):
        for buf in q.buffers():
            assert buf.device.type == device.type, name


def test_integer_layernorm_only_with_ptf():
    """Official config.py: INT_NORM = ptf. Without PTF every norm is float LayerNorm on the
    quantized residual; with PTF every norm is integer, also Swin's patch-embedding norm, which
    reads a layer-wise uniform quantizer."""
    for preset in ('fqvit_888', 'fqvit_884'):
        model, _, _ = _calibrated('swin', preset, batches=1)
        assert model.patch_embed.norm._integer_pair() is not None
        assert all(n._integer_pair() is not None for n in model.modules() if isinstance(n, QuantLayerNorm))
    model = tiny_vit()
    x = images(model, 2)
    spec = make_spec('fqvit', 8, 8, 8, ptf=False, lis=False)
    quantize_model(model, spec)
    CalibrationRunner(model, spec, progress=False).run([x])
    norms = [n for n in model.modules() if isinstance(n, QuantLayerNorm)]
    assert norms and not any(n.integer or n._integer_pair() for n in norms)
    assert type(model.blocks[0].attn_residual_quantizer).__name__ == 'UniformQuantizer'
