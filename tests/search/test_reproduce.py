"""The search scores candidates with the quantizers' own kernels: after a search, running the
module with its quantizers in 'quant' mode reproduces the score recorded for the chosen candidate."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqvit_det.nn.modules import AttentionQuantizers, QuantLinear
from fqvit_det.presets import GELU_MIN
from fqvit_det.quantizers import build_quantizer
from fqvit_det.search.attention import search_attention
from fqvit_det.search.capture import AttnRecorder
from fqvit_det.search.config import resolve_search_cfg
from fqvit_det.search.linear import search_linear

SMALL = dict(eq_n=16, top_k=4, levels=3, rounds=2, grid_n=20, screen_rows=16, confirm=2)
INPUTS = {
    'uniform': (dict(type='UniformQuantizer', bits=4, symmetric=True), lambda x: x),
    'twin_gelu': (dict(type='TwinUniformGeluQuantizer', bits=4), F.gelu),
    'adalog_gelu': (dict(type='AdaLogQuantizer', bits=4, shift=GELU_MIN, max_samples=4096), F.gelu),
}


def calibrated(cfg, x):
    q = build_quantizer(dict(cfg)).to(x.device)
    q.set_mode('observe')
    q(x)
    q.finalize()
    q.set_mode('quant')
    return q


@pytest.mark.parametrize('search,metric', [('hessian', 'hessian'), ('hessian', 'mse'),
                                           ('fpcs', 'mse'), ('fpcs', 'hessian')])
@pytest.mark.parametrize('kind', sorted(INPUTS))
def test_linear_module_reproduces_recorded_score(kind, search, metric, device):
    g = torch.Generator().manual_seed(3)
    in_cfg, act = INPUTS[kind]
    X = act(2 * torch.randn(96, 24, generator=g)).to(device)
    G = (torch.randn(96, 16, generator=g) * 0.1).to(device) if metric == 'hessian' else None
    lin = nn.Linear(24, 16).to(device)
    wq = build_quantizer(dict(type='UniformQuantizer', bits=4, symmetric=True, ch_axis=0))
    mod = QuantLinear.from_float(lin, wq.to(device), calibrated(in_cfg, X))
    mod.calibrate_weight()
    wq.set_mode('quant')
    before = wq.get_params() if hasattr(wq, 'get_params') else {'scale': wq.scale.clone()}
    cfg = resolve_search_cfg('m', search, dict(SMALL, metric=metric))
    rep = search_linear(mod, X, G, 2, mod.in_quantizer, True, 'grid' if search == 'hessian' else 'fpcs', cfg)
    assert rep['metric'] == metric and rep['searched'] == ['weight', 'input']
    assert rep['after'] >= rep['before']
    with torch.no_grad():
        out_q = mod(X)
        for q in (mod.w_quantizer, mod.in_quantizer):
            q.set_mode('float')
        mod.refresh()
        out_f = mod(X)
    err = out_q - out_f if G is None else G * (out_q - out_f)
    assert -float(err.pow(2).mean()) == pytest.approx(rep['after'], rel=1e-4, abs=1e-12)
    scale = (wq.get_params() if hasattr(wq, 'get_params') else {'scale': wq.scale})['scale']
    assert not torch.equal(scale.cpu(), before['scale'].cpu())     # the search changed something


@pytest.mark.parametrize('probs', ['AdaLogQuantizer', 'TwinUniformSoftmaxQuantizer'])
@pytest.mark.parametrize('search', ['hessian', 'fpcs'])
def test_attention_reproduces_recorded_score(probs, search, device):
    g = torch.Generator().manual_seed(4)
    B, H, N, d = 2, 2, 12, 8
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(device) for _ in range(3))
    scale = d ** -0.5
    head = dict(type='UniformQuantizer', bits=4, ch_axis=1)
    P = (q @ k.transpose(-2, -1) * scale).softmax(-1)
    aq = AttentionQuantizers(q=calibrated(head, q), k=calibrated(head, k), v=calibrated(head, v),
                             probs=calibrated(dict(type=probs, bits=4), P))
    rec = AttnRecorder(max_queries=64, seed=0, index=0)
    rec.frac = 1.0
    aq._recorder = rec
    with torch.no_grad():
        aq.attend(q, k, v, scale)
    del aq._recorder
    cfg = resolve_search_cfg('m', search, dict(SMALL, attn_images=2))
    rep = search_attention(aq, rec.records, 'grid' if search == 'hessian' else 'fpcs', cfg)
    assert rep['metric'] == 'mse' and rep['searched'] == ['q', 'k', 'probs', 'v']
    with torch.no_grad():
        out_q = aq.attend(q, k, v, scale)
    out_f = P @ v
    assert -float((out_q - out_f).pow(2).mean()) == pytest.approx(rep['after'], rel=1e-4)
    assert rep['after'] >= rep['before']
