"""Search of one Linear / Conv: alternating weight and input quantizer steps on captured rows.

Data: X (R, K) captured input rows (Conv: patches), optional g (R, C) output gradients, float W
(C, K). O = X·Wᵀ (float), Ô = q_in(X)·q_w(W)ᵀ (the bias cancels). Scores (higher is better):

* metric 'hessian' (PTQ4ViT): −mean((g ⊙ (O − Ô))²) (``hessian_guided_score``);
* metric 'mse': −mean((O − Ô)²).

Per-channel weight scales use the per-output-channel part of the same sum (an output channel's
error depends on its own weight row only), so channels are chosen independently. Errors are
evaluated in difference form (Ô − O = (X̂ − X)·Ŵᵀ + X·(Ŵ − W)ᵀ) so nothing cancels
catastrophically, and for MSE through Gram matrices when that is cheaper (exact:
Σ‖D·Ŵᵀ + E‖² = Σ D·(ŴᵀŴ)·Dᵀ + 2⟨D, E·Ŵ⟩ + ‖E‖²).

qkv / fc1 / patch-merging reductions have no input quantizer of their own: the output quantizer
of the LayerNorm feeding them is searched with the first of them (see ``runner.targets``).
Grouped convolutions and inputs whose per-channel axis is not the feature axis are not searched.
"""
import torch
from torch import nn

from ..quantizers.base import MIN_SCALE
from ..quantizers.uniform import UniformQuantizer
from .objectives import hessian_guided_score
from .select import search_quantizer
from .spaces import (AdaLogSpace, active, chunks, make_space, searchable, summarize_params,
                     take, weight_space)


class LinearProblem:
    """Search data of one Linear / Conv: X (R, K) rows, optional g (R, C), float W (C, K).

    Step errors are sums over (rows, output channels) of (g ⊙ (Ô − O))² ('hessian') or
    (Ô − O)²; scores are their negated means, i.e. ``hessian_guided_score`` / −MSE, split by
    output channel (weight steps) so per-channel weight scales can be chosen channel by channel.
    A step can be built on a subset of the rows (screening)."""

    def __init__(self, mod, X, G, in_apply, in_space, w_space, budget):
        self.mod, self.X, self.G = mod, X, G
        self.W = mod.weight.detach().float().reshape(mod.weight.shape[0], -1)
        self.in_apply, self.in_space, self.w_space, self.budget = in_apply, in_space, w_space, budget
        self.R, self.K = X.shape
        self.C = self.W.shape[0]

    def x_hat(self, X=None):
        X = self.X if X is None else X
        return X if self.in_apply is None else self.in_apply(X)

    def w_hat(self):
        wq = self.mod.w_quantizer
        if active(wq):
            return wq.fake_quant(self.mod.weight.detach()).float().reshape(self.C, -1)
        return self.W

    def score(self) -> float:
        """The layer's current score: ``hessian_guided_score(O, Ô, g)`` or −MSE(O, Ô)."""
        O = self.X @ self.W.t()
        Oh = self.x_hat() @ self.w_hat().t()
        if self.G is not None:
            return float(hessian_guided_score(O, Oh, self.G))
        return -float(((O - Oh) ** 2).mean())

    def _rows(self, rows):
        if rows is None:
            return self.X, self.G
        return self.X[rows], None if self.G is None else self.G[rows]

    def weight_gram(self, rows=None) -> bool:
        """Whether the weight step on these rows goes through the Gram matrix (MSE, K < rows)."""
        n = self.R if rows is None else len(rows)
        return self.G is None and self.K < n

    def weight_step(self, rows=None):
        """Ô − O = X̂·(Ŵ_cand − W)ᵀ + (X̂ − X)·Wᵀ with X̂ at its current quantization."""
        X, G = self._rows(rows)
        W, space = self.W, self.w_space
        Xh = self.x_hat(X)
        E0 = (Xh - X) @ W.t()                                   # (R, C)
        R, K, C = X.shape[0], self.K, self.C
        norm = float(R * C)
        if self.weight_gram(rows):     # MSE through the Gram matrix of X̂ (exact)
            Gx = Xh.t() @ Xh                                    # (K, K)
            H = E0.t() @ Xh                                     # (C, K)
            c0 = (E0 * E0).sum(0)                               # (C,)

            def scores(p):
                out = []
                for sl in chunks(p[0].shape[0], 3 * C * K, self.budget):
                    dW = space.fq(W, take(p, sl)).sub_(W)      # (m, C, K)
                    # Δw·Gx·Δwᵀ + 2Δw·h + c0 per channel
                    err = torch.linalg.vecdot(torch.matmul(dW, Gx).add_(H, alpha=2), dW) + c0
                    out.append(-err.double() / norm)
                return torch.cat(out)
            return scores

        def scores(p):                                          # (m, C)
            out = []
            for sl in chunks(p[0].shape[0], C * K + 2 * R * C, self.budget):
                dW = space.fq(W, take(p, sl)).sub_(W)
                E = torch.matmul(Xh, dW.transpose(1, 2)).add_(E0)   # (m, R, C)
                if G is not None:
                    E.mul_(G)
                out.append(-E.pow_(2).sum(1).double() / norm)
            return torch.cat(out)
        return scores

    def input_step(self, rows=None):
        """Ô − O = (X̂_cand − X)·Ŵᵀ + X·(Ŵ − W)ᵀ with Ŵ at its current quantization."""
        X, G = self._rows(rows)
        W, space = self.W, self.in_space
        Wh = self.w_hat()
        Ew = X @ (Wh - W).t()                                   # (R, C)
        R, K, C = X.shape[0], self.K, self.C
        norm = float(R * C)
        if G is None and K < C:      # MSE through the Gram matrix of Ŵ (exact)
            M = Wh.t() @ Wh                                     # (K, K)
            T = Ew @ Wh                                         # (R, K)
            c = float((Ew * Ew).sum())

            def scores(p):
                out = []
                for sl in chunks(p[0].shape[0], 3 * R * K, self.budget):
                    D = space.fq(X, take(p, sl)).sub_(X)       # (m, R, K)
                    err = ((D @ M) * D).sum((1, 2)) + 2 * (D * T).sum((1, 2)) + c
                    out.append(-err.double() / norm)
                return torch.cat(out)[:, None]
            return scores
        WhT = Wh.t().contiguous()

        def scores(p):                                          # (m, 1)
            out = []
            for sl in chunks(p[0].shape[0], R * (K + 2 * C), self.budget):
                D = space.fq(X, take(p, sl)).sub_(X)
                E = torch.matmul(D, WhT).add_(Ew)               # (m, R, C)
                if G is not None:
                    E.mul_(G)
                out.append(-E.pow_(2).sum((1, 2)).double() / norm)
            return torch.cat(out)[:, None]
        return scores


def _row_layout(q, mod, in_ndim):
    """(axis, repeat) placing an input quantizer's channels on X's columns, or None if impossible."""
    ch = getattr(q, 'ch_axis', None)
    if ch is None or (isinstance(q, UniformQuantizer) and q.get_params()['scale'].dim() == 0):
        return (None, 1)
    if not isinstance(q, UniformQuantizer):
        return None
    if isinstance(mod, nn.Conv2d):
        if in_ndim in (3, 4) and ch % in_ndim == in_ndim - 3:
            return (1, mod.kernel_size[0] * mod.kernel_size[1])
        return None
    if in_ndim and ch % in_ndim == in_ndim - 1:
        return (1, 1)
    return None


def search_linear(mod, X, G, in_ndim, in_q, search_in, method, cfg):
    """Alternating weight / input search of one Linear / Conv. Returns a report dict."""
    w_space = weight_space(mod)
    in_space, in_apply = None, None
    if active(in_q):
        layout = _row_layout(in_q, mod, in_ndim)
        if layout is None:
            return dict(skipped='its input quantizer\'s channel axis is not the feature axis')
        search_input = search_in and searchable(in_q)
        if search_input or isinstance(in_q, UniformQuantizer):
            sp = make_space(in_q, 2, layout[0], layout[1], per_channel=False)
            in_apply = sp.apply_current
            if search_input:
                in_space = sp
                if isinstance(sp, AdaLogSpace) and sp.two_d:
                    sp.top = max(float(X.max()) + in_q.shift, MIN_SCALE)
        else:
            def in_apply(x):
                return in_q.fake_quant(x).float()
    prob = LinearProblem(mod, X, G, in_apply, in_space, w_space, cfg['chunk_elems'])
    screen = None
    if 0 < cfg['screen_rows'] < prob.R:
        if G is not None:
            # the rows carrying most Fisher weight Σ_c g² (on DeiT-Tiny the top 1/8 of the rows
            # hold ~97 % of it: confidently classified images have tiny gradients)
            weight = G.double().pow(2).sum(1)
            screen = torch.sort(weight, descending=True, stable=True).indices[:cfg['screen_rows']]
            screen = screen.sort().values
        else:
            screen = torch.linspace(0, prob.R - 1, cfg['screen_rows']).round().long().to(X.device)
    before = prob.score()
    rounds = 0
    for _ in range(cfg['rounds']):
        rounds += 1
        changed = False
        if w_space is not None:
            # screen unless the screen step would use the Gram matrix too (same cost as all rows)
            ws = (prob.weight_step(screen) if screen is not None and not prob.weight_gram(screen)
                  else None)
            changed |= search_quantizer(w_space, prob.weight_step(), method, cfg, ws)
        if in_space is not None:
            ins = prob.input_step(screen) if screen is not None else None
            changed |= search_quantizer(in_space, prob.input_step(), method, cfg, ins)
        if not changed:
            break
    mod.refresh()
    searched = [(n, s) for n, s in (('weight', w_space), ('input', in_space)) if s is not None]
    rep = dict(metric='hessian' if G is not None else 'mse', before=before, after=prob.score(),
               rows=prob.R, rounds=rounds, searched=[n for n, _ in searched],
               params={n: summarize_params(s.q) for n, s in searched})
    if G is not None:
        rep['grad_rms'] = float(G.pow(2).mean().sqrt())
    return rep
