"""Layer-wise search (PTQ4ViT Hessian grid / AdaLog FPCS) on small timm models."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fqvit_det.search
from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.nn.modules import AttentionQuantizers, QuantConv2d, QuantLinear
from fqvit_det.presets import GELU_MIN, make_spec
from fqvit_det.quantizers.uniform import UniformQuantizer
from fqvit_det.search.capture import RowCapture
from fqvit_det.search.objectives import output_gradients, pseudo_label_loss
from fqvit_det.search.spaces import AdaLogSpace, UniformSpace
from fqvit_det.walk import named_quantizers

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """The models here are tiny: one intra-op thread is faster (and insensitive to other load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Small search settings keep the file fast (the ViT PTQ4ViT run uses the defaults).
SMALL = dict(eq_n=32, top_k=8, levels=3, rounds=2, grid_n=40)
TINY = dict(eq_n=16, top_k=4, levels=2, rounds=1, grid_n=20, attn_images=1)


def vit():
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=2, img_size=64,
                             num_classes=10).eval()


def swin():
    torch.manual_seed(0)
    return timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, depths=(1, 1, 1, 1),
                             embed_dim=32, num_heads=(1, 2, 2, 4), num_classes=10, img_size=64,
                             window_size=4).eval()


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g)


def fast_roles(method, bits):
    """AdaLog quantizers with a small calibration pool (their own finalize search is slow)."""
    if method != 'adalog':
        return None
    return dict(attn_probs=dict(type='AdaLogQuantizer', bits=bits, max_samples=4096),
                fc2_input=dict(type='AdaLogQuantizer', bits=bits, shift=GELU_MIN,
                               max_samples=4096))


def calibrate(build, method, bits, batches, search_cfg=None, monkeypatch=None):
    model = build().to(batches[0].device)
    spec = make_spec(method, bits, bits, roles=fast_roles(method, bits),
                     search_cfg=search_cfg or {})
    quantize_model(model, spec)
    seen = {}
    if monkeypatch is not None:
        real = fqvit_det.search.run_search

        def wrapped(m, sp, b, fn, progress=True):
            seen['before'] = copy.deepcopy(m.state_dict())
            seen['report'] = real(m, sp, b, fn, progress=progress)
            return seen['report']
        monkeypatch.setattr(fqvit_det.search, 'run_search', wrapped)
    CalibrationRunner(model, spec, progress=False).run(batches)
    return model, spec, seen


def feeder_of(model, name):
    for norm_path, lins in model.fqvit_reparam_pairs:
        if name in lins:
            return model.get_submodule(norm_path).out_quantizer
    return None


def layer_errors(model, x, names, hessian):
    """Parallel-protocol layer-output error of each Linear: all quantizers float except the layer's
    own (weight, input or the norm output feeding it); Hessian-weighted by ∂L/∂O of the float model."""
    quants = named_quantizers(model)
    modes = {id(q): q.mode for _, q in quants}
    outs = {}

    def run(enabled):
        for _, q in quants:
            q.mode = 'quant' if id(q) in enabled else 'float'
        for m in model.modules():
            if hasattr(m, 'refresh'):
                m.refresh()
        got = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda mod, a, o, n=n: got.__setitem__(n, o.detach())) for n in names]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return got

    ref = run(set())
    grads = None
    if hessian:
        mods = [model.get_submodule(n) for n in names]
        g = output_gradients(model, x, mods, loss_fn=pseudo_label_loss)
        grads = {n: g[m][0] * x.shape[0] for n, m in zip(names, mods)}
    for n in names:
        mod = model.get_submodule(n)
        qs = [mod.w_quantizer, mod.in_quantizer or feeder_of(model, n)]
        out = run({id(q) for q in qs if q is not None})[n]
        d = out - ref[n]
        if grads is not None:
            d = d * grads[n]
        outs[n] = float((d ** 2).mean())
    for _, q in quants:
        q.mode = modes[id(q)]
    return outs


def quantizer_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


CASES = [('vit', 'ptq4vit', 6, dict(screen_rows=0)),       # exhaustive PTQ4ViT grid
         ('vit', 'adalog', 4, dict(SMALL, screen_rows=32)),    # screened FPCS
         ('swin', 'ptq4vit', 6, dict(TINY)),
         ('swin', 'adalog', 4, dict(TINY))]


@pytest.mark.parametrize('arch,method,bits,cfg', CASES)
def test_search_improves_every_layer(arch, method, bits, cfg, monkeypatch, device):
    build = vit if arch == 'vit' else swin
    x = data(4 if arch == 'vit' else 2).to(device)
    batches = [x[:2], x[2:]] if arch == 'vit' else [x]
    cfg = dict(cfg, max_rows=100000)
    model, spec, seen = calibrate(build, method, bits, batches, cfg, monkeypatch=monkeypatch)
    rep = seen['report']
    hessian = method == 'ptq4vit'
    assert rep['metric'] == ('hessian' if hessian else 'mse')
    assert rep['images'] == x.shape[0]
    mods = rep['modules']
    lin_names = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    attn_names = [n for n, m in model.named_modules() if isinstance(m, AttentionQuantizers)]
    assert set(lin_names) <= set(mods) and set(attn_names) <= set(mods)
    assert rep['modules_searched'] == len(mods) and not rep['skipped']
    for name, r in mods.items():
        assert r['metric'] == ('mse' if name in attn_names or not hessian else 'hessian'), name
        assert r['params'] and set(r['params']) == set(r['searched']) and r['seconds'] >= 0
        assert r['after'] >= r['before'] - 1e-6 * abs(r['before']), (name, r)
        if hessian and name in lin_names:
            assert r['grad_rms'] > 0, name          # real (non-zero) Fisher weights
    # parameters changed
    after = quantizer_state(model)
    before = {k: v for k, v in seen['before'].items() if k in after}
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert any('w_quantizer' in k for k in changed)
    assert any('w_quantizer' not in k for k in changed)
    # independent check, on the calibration images, of every searched Linear's output error
    lin_only = [n for n in lin_names if isinstance(model.get_submodule(n), QuantLinear)]
    err_after = layer_errors(model, x, lin_only, hessian)
    searched = copy.deepcopy(model.state_dict())
    model.load_state_dict(seen['before'])
    err_before = layer_errors(model, x, lin_only, hessian)
    model.load_state_dict(searched)
    for n in lin_only:
        assert err_after[n] <= err_before[n] * (1 + 1e-4) + 1e-12, (n, err_before[n], err_after[n])
        assert err_after[n] == pytest.approx(-mods[n]['after'], rel=1e-3, abs=1e-12)
    assert sum(err_after.values()) < sum(err_before.values())
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize('arch,method,bits,cfg', [('vit', 'adalog', 4, dict(TINY, screen_rows=32)),
                                                  ('swin', 'ptq4vit', 6, TINY)])
def test_search_deterministic(arch, method, bits, cfg, device):
    build = vit if arch == 'vit' else swin
    x = data(4 if arch == 'vit' else 2).to(device)
    states = []
    for _ in range(2):
        model, _, _ = calibrate(build, method, bits, [x[:2], x[2:]] if arch == 'vit' else [x], cfg)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_hessian_metric_needs_logits_and_says_the_fix(device):
    """No silent fallback: a non-logits output with metric 'hessian' is an error naming the fix;
    metric='mse' chosen explicitly runs."""
    x = data(4).to(device)
    fwd = lambda m, b: {'logits': m(b['img'])}  # noqa: E731  (a detector-like output)
    model = vit().to(device)
    spec = make_spec('ptq4vit', 6, 6, search_cfg=TINY)
    quantize_model(model, spec)
    with pytest.raises(ValueError, match=r"quant_cfg.search_cfg.metric='mse'"):
        CalibrationRunner(model, spec, forward_fn=fwd, progress=False).run([{'img': x}])
    model = vit().to(device)
    spec = make_spec('ptq4vit', 6, 6, search_cfg=dict(TINY, metric='mse'))
    quantize_model(model, spec)
    runner = CalibrationRunner(model, spec, forward_fn=fwd, progress=False)
    runner.run([{'img': x}])
    rep = runner.search_report
    assert rep['metric'] == 'mse' and rep['modules']
    assert all(r['metric'] == 'mse' for r in rep['modules'].values())
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_report_and_image_cap(monkeypatch, device):
    x = data(8).to(device)
    _, _, seen = calibrate(vit, 'ptq4vit', 6, [x[:4], x[4:]],
                           dict(TINY, images=5, grad_batch=2, attn_images=1, screen_rows=32),
                           monkeypatch=monkeypatch)
    rep = seen['report']
    assert rep['images'] == 5 and rep['metric'] == 'hessian'
    for r in rep['modules'].values():         # screened (Fisher-heaviest rows) + confirmed
        assert r['after'] >= r['before'] - 1e-6 * abs(r['before'])
    assert rep['modules']['blocks.0.attn.aq']['images_rows'] == 1
    assert rep['modules']['blocks.0.attn.qkv']['rows'] == 5 * 17


# --- helpers ----------------------------------------------------------------------------------
def test_uniform_space_alpha_one_is_current():
    torch.manual_seed(0)
    for sym in (True, False):
        q = UniformQuantizer(4, symmetric=sym, ch_axis=0)
        q.observe(torch.randn(6, 10))
        q.finalize()
        sp = UniformSpace(q, 2, 0, per_channel=True)
        s, z = sp.from_alpha(torch.ones(1))
        torch.testing.assert_close(s[0], q.scale)
        torch.testing.assert_close(z[0], q.zero_point)
        w = torch.randn(6, 10)
        torch.testing.assert_close(sp.fq(w, sp.current())[0], q.fake_quant(w))


@pytest.mark.parametrize('kw', [dict(kernel_size=3, padding=1), dict(kernel_size=4, stride=4),
                                dict(kernel_size=3, stride=2, dilation=2, padding=2,
                                     padding_mode='reflect')])
def test_conv_patches_reproduce_output(kw):
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 5, **kw))
    cap = RowCapture(conv, 0, 0)
    cap.quota = 40
    x = torch.randn(2, 3, 12, 12)
    h = conv.register_forward_hook(cap.hook)
    with torch.no_grad():
        out = conv(x)
        h.remove()
        X, _ = cap.result(1000, False)
        y = X @ conv.weight.reshape(5, -1).t() + conv.bias
    rows = out.permute(0, 2, 3, 1).reshape(-1, 5)
    # every patch row equals one output position
    d = (y[:, None, :] - rows[None, :, :]).abs().amax(-1).min(dim=1).values
    assert X.shape[0] == min(40, rows.shape[0]) and float(d.max()) < 1e-5


def test_attention_recorder_is_off_by_default():
    aq = AttentionQuantizers()
    assert aq._recorder is None
    q, k, v = torch.randn(3, 2, 1, 5, 4).unbind(0)
    out = aq.attend(q, k, v, 0.5)
    ref = F.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
    torch.testing.assert_close(out, ref)
    seen = []
    aq._recorder = lambda *a: seen.append(a)
    aq.attend(q, k, v, 0.5)
    assert len(seen) == 1 and seen[0][1] is q


@pytest.mark.parametrize('ch,axis', [(None, None), (1, 1), (-1, 3)])
@pytest.mark.parametrize('sym', [True, False])
def test_uniform_candidates_match_quantizer(ch, axis, sym):
    torch.manual_seed(0)
    q = UniformQuantizer(4, symmetric=sym, ch_axis=ch)
    x = torch.randn(2, 3, 5, 4)
    q.observe(x)
    q.finalize()
    sp = UniformSpace(q, 4, axis, per_channel=ch == 1)
    a = torch.rand(5, 3) + 0.3 if ch == 1 else torch.rand(5) + 0.3
    p = sp.from_alpha(a)
    out = sp.fq(x, p)
    for i in range(5):
        ref = UniformQuantizer(4, symmetric=sym, ch_axis=ch)
        ref.set_params(p[0][i], p[1][i])
        torch.testing.assert_close(out[i], ref.fake_quant(x), rtol=0, atol=0)


@pytest.mark.parametrize('shift', [0.0, GELU_MIN])
def test_adalog_candidates_match_quantizer(shift):
    from fqvit_det.quantizers.adalog import AdaLogQuantizer
    torch.manual_seed(0)
    x = F.gelu(2 * torch.randn(60, 16)) if shift else torch.randn(60, 16).softmax(-1)
    x[0, 0] = 0.0
    q = AdaLogQuantizer(4, shift=shift)
    q.observe(x)
    q.finalize()
    sp = AdaLogSpace(q, 2)
    d, qq = torch.tensor([0.5, 1.0, 3.3]), torch.tensor([10, 37, 137])
    out = sp.fq(x, (d, qq))
    for i in range(3):
        q.set_params(delta=float(d[i]), q=int(qq[i]))
        torch.testing.assert_close(out[i], q.fake_quant(x), rtol=0, atol=0)
