"""Search building blocks: PTQ4ViT grid, Hessian-guided score, output gradients, FPCS."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqvit_det.quantizers.base import MIN_SCALE
from fqvit_det.search.fpcs import fast_progressive_combining_search, ptq4vit_candidates
from fqvit_det.search.objectives import hessian_guided_score, output_gradients, pseudo_label_loss


def fpcs_best(*args, **kw):
    """(best candidate, its score) of an FPCS run."""
    surv, scores = fast_progressive_combining_search(*args, **kw)
    return surv[0], scores[0]


# --- PTQ4ViT candidates ---------------------------------------------------------------------
def test_ptq4vit_candidates_scalar_inclusive():
    c = ptq4vit_candidates(torch.tensor(2.0))
    ref = [(0.01 + i * (1.2 - 0.01) / 100) * 2.0 for i in range(101)]
    assert c.shape == (101,)
    torch.testing.assert_close(c.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=0)
    assert abs(float(c[-1]) - 2.4) < 1e-6           # the 1.2x candidate is kept
    c2 = ptq4vit_candidates(0.5, alpha=0.0, beta=1.0, n=4)
    torch.testing.assert_close(c2, torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5]))


def test_ptq4vit_candidates_per_channel():
    base = torch.tensor([[1.0], [3.0], [0.5]])
    c = ptq4vit_candidates(base, n=10)
    assert c.shape == (11, 3, 1)
    for i in range(11):
        f = 0.01 + i * (1.2 - 0.01) / 10
        torch.testing.assert_close(c[i], base * f)


# --- Hessian-guided score -------------------------------------------------------------------
def test_hessian_guided_score_matches_loops():
    g = torch.Generator().manual_seed(0)
    fp = torch.randn(2, 3, 4, generator=g)
    grad = torch.randn(2, 3, 4, generator=g)
    q = fp + 0.1 * torch.randn(5, 2, 3, 4, generator=g)
    scores = hessian_guided_score(fp, q, grad)
    assert scores.shape == (5,)
    for k in range(5):
        acc = 0.0
        for idx in range(fp.numel()):
            d = float(fp.reshape(-1)[idx]) - float(q[k].reshape(-1)[idx])
            acc += (float(grad.reshape(-1)[idx]) * d) ** 2
        assert math.isclose(float(scores[k]), -acc / fp.numel(), rel_tol=1e-5)
        assert math.isclose(float(hessian_guided_score(fp, q[k], grad)), -acc / fp.numel(),
                            rel_tol=1e-5)
    assert float(hessian_guided_score(fp, fp, grad)) == 0.0


# --- output gradients -------------------------------------------------------------------------
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5)).eval()


def kl_as_ptq4vit(out, fp):
    """PTQ4ViT's loss: KL(softmax(fp) || softmax(model)); the model is float, so fp == out."""
    return F.kl_div(F.log_softmax(out, dim=-1), F.softmax(fp, dim=-1), reduction='batchmean')


def test_output_gradients_match_manual_autograd_and_are_nonzero():
    model = mlp()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    grads = output_gradients(model, x, [model[0], model[2]])
    # manual reference: retain grads of the intermediate outputs, CE against argmax pseudo-labels
    h = model[0](x)
    h.retain_grad()
    out = model[2](model[1](h))
    out.retain_grad()
    F.cross_entropy(out, out.detach().argmax(-1)).backward()
    assert len(grads[model[0]]) == 1 and len(grads[model[2]]) == 1
    torch.testing.assert_close(grads[model[0]][0], h.grad)
    torch.testing.assert_close(grads[model[2]][0], out.grad)
    # dL/dlogits = (softmax - onehot(argmax)) / batch, written out
    p = out.detach().softmax(-1)
    onehot = F.one_hot(out.detach().argmax(-1), 5).float()
    torch.testing.assert_close(grads[model[2]][0], (p - onehot) / 6)
    assert grads[model[0]][0].abs().max() > 1e-4
    assert grads[model[2]][0].abs().max() > 1e-3


def test_kl_against_itself_gives_zero_gradient_bug():
    model = mlp()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    good = output_gradients(model, x, [model[0], model[2]])
    bad = output_gradients(model, x, [model[0], model[2]], loss_fn=kl_as_ptq4vit)
    for m in (model[0], model[2]):
        assert bad[m][0].abs().max() < 1e-6 * good[m][0].abs().max() + 1e-7
        assert good[m][0].abs().max() > 1e3 * bad[m][0].abs().max()


def test_pseudo_label_loss_is_cross_entropy_to_argmax():
    g = torch.Generator().manual_seed(3)
    logits, fp = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    labels = fp.argmax(-1)
    ref = 0.0
    for b in range(2):
        for t in range(4):
            z = logits[b, t].double()
            ref += float(torch.logsumexp(z, 0) - z[labels[b, t]])
    assert math.isclose(float(pseudo_label_loss(logits, fp)), ref / 8, rel_tol=1e-5)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lin(torch.tanh(self.lin(x)) * 2.0))


def test_module_called_twice_gets_grads_in_forward_order():
    model = Shared()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))
    grads = output_gradients(model, x, [model.lin, model.head, model.lin])   # duplicate ignored
    assert len(grads) == 2 and len(grads[model.lin]) == 2 and len(grads[model.head]) == 1
    a = model.lin(x)
    a.retain_grad()
    b = model.lin(torch.tanh(a) * 2.0)
    b.retain_grad()
    out = model.head(b)
    F.cross_entropy(out, out.detach().argmax(-1)).backward()
    torch.testing.assert_close(grads[model.lin][0], a.grad)
    torch.testing.assert_close(grads[model.lin][1], b.grad)


def test_output_gradients_leave_params_alone_and_work_frozen():
    model = mlp()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    sentinel = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = sentinel
    g1 = output_gradients(model, x, [model[0]])
    assert model[0].weight.grad is sentinel and model[2].weight.grad is None
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():                      # callers inside no_grad still get gradients
        g2 = output_gradients(model, x, [model[0]])
    torch.testing.assert_close(g1[model[0]][0], g2[model[0]][0])
    assert not x.requires_grad


def test_output_gradients_explicit_fp_outputs_and_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(8)
            self.fc = nn.Linear(4, 3)

        def forward(self, a, b):
            return self.fc(a + b)

    model = Two()
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    fp = torch.randn(3, 3, generator=g)
    grads = output_gradients(model, (a, b), [model.fc], fp_outputs=fp)
    out = model(a, b)
    ref = (out.softmax(-1) - F.one_hot(fp.argmax(-1), 3)) / 3
    torch.testing.assert_close(grads[model.fc][0], ref.detach())


# --- FPCS --------------------------------------------------------------------------------------
class Counter:
    def __init__(self, fn):
        self.fn, self.n, self.calls = fn, 0, []

    def __call__(self, c):
        self.n += c.shape[0]
        self.calls.append(c.clone())
        return self.fn(c)


def test_fpcs_1d_beats_coarse_grid():
    opt = 0.3137
    f = Counter(lambda c: -(c[:, 0] - opt) ** 2)
    grid = torch.linspace(0, 1, 11)
    best, score = fpcs_best(grid, 0.1, f, top_k=4, levels=6, eq_n=32)
    coarse_err = (grid - opt).abs().min()
    assert best.shape == (1,)
    assert abs(float(best) - opt) < 1e-4 < float(coarse_err)
    assert f.n <= 11 + 5 * 32
    assert float(score) == pytest.approx(-(float(best) - opt) ** 2, abs=1e-12)


def test_fpcs_2d_beats_coarse_grid_and_is_deterministic():
    a, b = 0.3137, -0.271

    def f(c):
        return -((c[:, 0] - a) ** 2 + 2 * (c[:, 1] - b) ** 2 + 0.5 * (c[:, 0] - a) * (c[:, 1] - b))
    gx, gy = torch.meshgrid(torch.linspace(0, 1, 11), torch.linspace(-1, 1, 11), indexing='ij')
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    counter = Counter(f)
    best, score = fpcs_best(grid, [0.1, 0.2], counter)
    assert counter.n <= 121 + 5 * 128
    coarse_best = grid[f(grid).argmax()]
    assert (best - torch.tensor([a, b])).abs().max() < 2e-3
    assert (coarse_best - torch.tensor([a, b])).abs().max() > 1e-2
    best2, score2 = fpcs_best(grid, [0.1, 0.2], f)
    assert torch.equal(best, best2) and float(score) == float(score2)


def test_fpcs_integer_dimension():
    def f(c):
        return -((c[:, 0] - 0.37) ** 2) - 0.05 * (c[:, 1] - 7) ** 2
    xs, qs = torch.meshgrid(torch.linspace(0, 1, 5), torch.arange(0, 16, 3.0), indexing='ij')
    grid = torch.stack([xs.reshape(-1), qs.reshape(-1)], 1)
    counter = Counter(f)
    best, _ = fpcs_best(grid, [0.25, 3.0], counter, top_k=8, eq_n=64,
                                                integer_dims=(1,))
    assert float(best[1]) == 7.0
    assert abs(float(best[0]) - 0.37) < 1e-3
    evaluated = torch.cat(counter.calls)
    assert torch.equal(evaluated[:, 1], evaluated[:, 1].round())
    # each batch is deduplicated
    for c in counter.calls:
        assert torch.unique(c, dim=0).shape[0] == c.shape[0]


def test_fpcs_bounds_and_single_level():
    f = lambda c: -(c[:, 0] + 0.05) ** 2           # optimum below the lower bound  # noqa: E731
    best, _ = fpcs_best(torch.linspace(0, 1, 11), 0.1, f, lower=0.0)
    assert float(best) == 0.0
    best1, s1 = fpcs_best(torch.linspace(0, 1, 11), 0.1,
                                                  lambda c: -(c[:, 0] - 0.42) ** 2, levels=1)
    assert abs(float(best1) - 0.4) < 1e-6


def ref_uniform_mse(x, scale, zp, bits):
    """Asymmetric uniform quantization MSE, clamp(round(x/s) + z, 0, 2^b - 1); scale / zp: [k]."""
    scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
    q = torch.clamp(torch.round(x[None] / scale) + zp, 0, 2 ** bits - 1)
    return ((q - zp) * scale - x[None]).pow(2).mean(dim=1)


def uniform_grid(x, bits, weights, eq_n=128):
    """A (scale, zero point) coarse grid: scales from (q_0.9 − q_0.1) to (max − min) over
    2^b − 1, zero points centred at 2^(b−1) (AdaLog's uniform grid); with its spacing."""
    num_zp = min(16, 2 ** (bits - 1)) if weights else min(16, 2 ** bits)
    num_scale = eq_n // num_zp
    lo = float(torch.quantile(x, 0.9) - torch.quantile(x, 0.1)) / (2 ** bits - 1)
    hi = float(x.max() - x.min()) / (2 ** bits - 1)
    scales = torch.linspace(lo, hi, num_scale)
    zps = torch.arange(num_zp, dtype=torch.float32) + 2 ** (bits - 1) - num_zp // 2
    rows = torch.stack([scales.repeat(num_zp), zps.repeat_interleave(num_scale)], 1)
    return rows, torch.tensor([(hi - lo) / (num_scale - 1), 1.0])


@pytest.mark.parametrize('bits,weights', [(4, False), (6, True)])
def test_fpcs_quantization_mse_close_to_brute_force(bits, weights):
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(900, generator=g), torch.randn(300, generator=g) * 0.3 + 1.5])
    cands, spacing = uniform_grid(x, bits, weights)
    xd = x.double()

    def score(c):
        c = c.double()
        return -ref_uniform_mse(xd, c[:, 0], c[:, 1], bits)
    best, best_score = fpcs_best(
        cands, spacing, score, integer_dims=(1,), lower=torch.tensor([MIN_SCALE, 0.0]))
    coarse = score(cands).max()
    # brute force: every candidate zero point x a fine scale grid spanning the coarse range
    zps = torch.unique(cands[:, 1])
    s_lo, s_hi = float(cands[:, 0].min()), float(cands[:, 0].max())
    fine = torch.linspace(s_lo - float(spacing[0]), s_hi + float(spacing[0]), 1000).double()
    brute = max(float(-ref_uniform_mse(xd, fine, z.expand_as(fine), bits).min()) for z in zps.double())
    assert float(best_score) > float(coarse)          # strictly better than the coarse grid
    assert -float(best_score) <= -brute * (1 + 2e-3)
    assert float(best[1]) in zps.tolist()
    assert float(best_score) == pytest.approx(float(score(best[None])[0]), rel=1e-12)


def test_fpcs_columns_equal_one_search_per_column():
    """Independent columns (per-channel scales) give each column's own 1-D FPCS result."""
    g = torch.Generator().manual_seed(0)
    opt = torch.rand(3, generator=g).double() + 0.3

    def score(a):                      # (m, 3): independent bumpy functions per column
        return -((a - opt) ** 2 + 0.01 * torch.sin(40 * a))
    init = torch.linspace(0.01, 1.2, 32, dtype=torch.float64)
    surv, scores = fast_progressive_combining_search(init, 1.19 / 31, score, top_k=4, levels=4,
                                                     eq_n=32, lower=1e-4, columns=3)
    assert surv.shape == (4, 3) and scores.shape == (4, 3)
    for c in range(3):
        s1, sc1 = fast_progressive_combining_search(
            init, 1.19 / 31, lambda a: score(a.expand(-1, 3))[:, c], top_k=4, levels=4, eq_n=32,
            lower=1e-4)
        torch.testing.assert_close(surv[:, c], s1[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(scores[:, c], sc1, rtol=0, atol=0)


def test_fpcs_tol_stops_early_and_never_loses_the_best():
    f = Counter(lambda c: -(c[:, 0] - 0.5) ** 2)   # 0.5 is on the coarse grid: no level improves
    surv, s = fast_progressive_combining_search(torch.linspace(0, 1, 11), 0.1, f, top_k=2,
                                                levels=6, eq_n=8, tol=0.0)
    assert float(surv[0, 0]) == 0.5 and len(f.calls) == 2     # coarse grid + one level
    f2 = Counter(lambda c: -(c[:, 0] - 0.5) ** 2)
    fast_progressive_combining_search(torch.linspace(0, 1, 11), 0.1, f2, top_k=2, levels=6, eq_n=8)
    assert len(f2.calls) == 6
    with pytest.raises(ValueError, match='d = 1'):
        fast_progressive_combining_search(torch.zeros(4, 2), [1, 1], lambda a: a[..., 0],
                                          columns=3)
