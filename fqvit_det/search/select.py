"""One coordinate step of the layer search: choose one quantizer's parameters.

A *step* scores candidates: ``step(p) -> (n, channels)`` float64 scores, higher is better
(per output channel / per head where the quantizer's parameters are, else one column).
"""
import torch

from ..quantizers.adalog import ADALOG_Q_MAX, ADALOG_Q_MIN, adalog_base_candidates
from ..quantizers.base import MIN_SCALE
from .fpcs import fast_progressive_combining_search, nan_low, ptq4vit_candidates
from .spaces import AdaLogSpace, ExpSpace, Space, UniformSpace, cat, same, take

ALPHA_FLOOR = 1e-4          # FPCS lower bound for α (a scale must stay positive)
ADALOG_GELU_GRID = (16, 8)  # (Δ values, q values) of AdaLog's post-GELU coarse grid


def _fpcs(init, spacing, fn, cfg, **kw):
    return fast_progressive_combining_search(init, spacing, fn, top_k=cfg['top_k'],
                                             levels=cfg['levels'], eq_n=cfg['eq_n'],
                                             tol=cfg['fpcs_tol'], **kw)


def _shortlist(space: Space, method: str, cfg: dict, scores, k: int):
    """The k best candidates of ``space`` under ``scores`` (the screening step when screening):
    the PTQ4ViT grid ('grid') or FPCS ('fpcs') for uniform spaces, the exponent grid for twin
    uniform, FPCS over q (post-softmax, Δ fixed) or (Δ, q) (post-GELU) for AdaLog."""
    cur = space.current()

    def total(p):
        return scores(p).sum(dim=1)

    def best_rows(cand):
        s = scores(cand)
        if space.per_channel:
            idx = torch.sort(nan_low(s), dim=0, descending=True, stable=True).indices[:k]
            idx = idx.to(cand[0].device)
            return tuple(torch.gather(t, 0, idx) for t in cand)
        order = torch.sort(nan_low(s.sum(dim=1)), descending=True, stable=True).indices[:k]
        return take(cand, order.to(cand[0].device))

    if isinstance(space, UniformSpace):
        if method == 'grid':
            alphas = ptq4vit_candidates(torch.tensor(1.0, dtype=torch.float64), cfg['alpha_min'],
                                        cfg['alpha_max'], cfg['grid_n'])
            return best_rows(cat(cur, space.from_alpha(alphas)))
        a0, a1, n = cfg['alpha_min'], cfg['alpha_max'], cfg['eq_n']
        init = torch.linspace(a0, a1, n, dtype=torch.float64)
        spacing = (a1 - a0) / max(n - 1, 1)
        if space.per_channel:
            surv, _ = _fpcs(init, spacing, lambda a: scores(space.from_alpha(a)), cfg,
                            lower=ALPHA_FLOOR, columns=space.channels)
            return space.from_alpha(surv[:k])
        surv, _ = _fpcs(init, spacing, lambda a: total(space.from_alpha(a[:, 0])), cfg,
                        lower=ALPHA_FLOOR)
        return space.from_alpha(surv[:k, 0])
    if isinstance(space, ExpSpace):
        return best_rows(cat(cur, space.grid()))
    if isinstance(space, AdaLogSpace):
        if not space.two_d:
            d = cur[0]

            def params_q(a):
                return d.expand(a.shape[0]).clone(), torch.round(a[:, 0]).to(torch.int64)
            surv, _ = _fpcs(adalog_base_candidates().to(torch.float64), 1.0,
                            lambda a: total(params_q(a)), cfg, integer_dims=(0,), lower=1.0)
            return params_q(surv[:k])
        nd, nq = ADALOG_GELU_GRID
        ds = torch.linspace(0.25, 1.2, nd, dtype=torch.float64) * space.top
        qv = torch.round(torch.linspace(ADALOG_Q_MIN, ADALOG_Q_MAX, nq, dtype=torch.float64))

        def params_dq(a):
            return a[:, 0].float().clamp(min=MIN_SCALE), torch.round(a[:, 1]).to(torch.int64)
        surv, _ = _fpcs(torch.cartesian_prod(ds, qv), [float(ds[1] - ds[0]), float(qv[1] - qv[0])],
                        lambda a: total(params_dq(a)), cfg, integer_dims=(1,),
                        lower=[MIN_SCALE, 1.0])
        return params_dq(surv[:k])
    raise TypeError(f'no candidate space for {type(space.q).__name__}')


def search_quantizer(space: Space, step, method: str, cfg: dict, screen=None) -> bool:
    """Choose ``space.q``'s parameters by ``step``; True if they changed.

    ``method``: 'grid' (PTQ4ViT grids) or 'fpcs' (AdaLog). With ``screen`` (the same error on a
    subset of the rows) the grid / FPCS runs on ``screen`` and its ``confirm`` best candidates are
    re-scored with ``step`` (all rows) together with the current parameters; otherwise the search
    runs on ``step`` directly. The current parameters are always a candidate and win ties, so a
    module's score never decreases."""
    cur = space.current()
    k = cfg['confirm'] if screen is not None else 1
    shortlist = _shortlist(space, method, cfg, screen if screen is not None else step, k)
    full = cat(cur, tuple(t.to(c.device) for t, c in zip(shortlist, cur)))
    scores = step(full)
    if space.per_channel:
        idx = torch.argmax(nan_low(scores), dim=0).to(full[0].device)
        cols = torch.arange(scores.shape[1], device=full[0].device)
        best = tuple(t[idx, cols][None] for t in full)
    else:
        i = int(torch.argmax(nan_low(scores.sum(dim=1))))
        best = take(full, slice(i, i + 1))
    if same(best, cur):
        return False
    space.apply(best)
    return True
