"""Candidate grids: PTQ4ViT's linear grid and AdaLog's fast progressive combining search (FPCS).

Scores follow one convention: higher is better (negative errors); NaN ranks last.
"""
from typing import Callable, Dict, List, Optional, Sequence

import torch


def ptq4vit_candidates(base, alpha: float = 0.01, beta: float = 1.2, n: int = 100) -> torch.Tensor:
    """Scale candidates (α + i(β − α)/n) · base for i = 0..n inclusive: shape [n + 1, *base.shape].

    The official PTQ4ViT code builds the same list but leaves out i = n (the β = 1.2× candidate); we
    keep it, so the grid really spans [α, β] as the paper states.
    """
    if n < 1:
        raise ValueError(f'ptq4vit_candidates: n must be >= 1, got {n}')
    base = torch.as_tensor(base)
    if not base.is_floating_point():
        base = base.to(torch.get_default_dtype())
    i = torch.arange(n + 1, dtype=torch.float64)
    factors = (alpha + i * (beta - alpha) / n).to(base.dtype).to(base.device)
    return factors.reshape(-1, *([1] * base.dim())) * base


def nan_low(scores: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(scores, nan=float('-inf'))


def _grid_counts(m: int, active: List[int], rotate: int) -> Dict[int, int]:
    """Points per active dimension for a product grid of at most m points, as balanced as possible;
    leftover factors go to the dimensions in turn, starting at ``rotate`` (changes every level)."""
    counts = {d: 1 for d in active}
    if not active:
        return counts
    k = len(active)
    order = [active[(i + rotate) % k] for i in range(k)]
    total = 1
    changed = True
    while changed:
        changed = False
        for d in order:
            if total // counts[d] * (counts[d] + 1) <= m:
                total = total // counts[d] * (counts[d] + 1)
                counts[d] += 1
                changed = True
    return counts


def _top(cands: torch.Tensor, scores: torch.Tensor, k: int):
    """The k best rows per column, best first (stable: ties keep the earlier row).
    cands (N, C, d), scores (N, C)."""
    order = torch.sort(nan_low(scores), dim=0, descending=True, stable=True).indices[:k]
    idx = order.to(cands.device)[..., None].expand(-1, -1, cands.shape[2])
    return torch.gather(cands, 0, idx), torch.gather(scores, 0, order)


def _new_points(new: torch.Tensor, surv: torch.Tensor):
    """Deduplicate new candidates per column and drop those already among the survivors.

    One column (any d): ``torch.unique`` rows (sorted), survivors removed; returns (rows, None).
    Several columns (d = 1): values sorted per column; duplicates and survivors are kept in place
    but flagged, so every column has the same number of rows; returns (rows, flags)."""
    if new.shape[1] == 1:
        rows = torch.unique(new[:, 0, :], dim=0)
        ref = surv[:, 0, :]
        member = (rows[:, None, :] == ref[None, :, :]).all(-1).any(-1)
        return rows[~member][:, None, :], None
    vals = torch.sort(new[..., 0], dim=0).values                       # (N, C)
    dup = torch.zeros_like(vals, dtype=torch.bool)
    dup[1:] = vals[1:] == vals[:-1]
    dup |= (vals[:, None, :] == surv[None, :, :, 0]).any(1)
    return vals[..., None], dup


def fast_progressive_combining_search(init_candidates, spacing, score_fn: Callable,
                                      top_k: int = 16, levels: int = 6, eq_n: int = 128,
                                      integer_dims: Sequence[int] = (), lower=None, upper=None,
                                      tol: Optional[float] = None, columns: Optional[int] = None):
    """AdaLog's FPCS, generalised to d parameters and to independent columns.

    Args:
        init_candidates: coarse grid, ``[n, d]`` (or ``[n]`` for d = 1), one candidate per row.
        spacing: the coarse grid's spacing δ per dimension (scalar or ``[d]``).
        score_fn: ``columns=None``: ``[m, d]`` candidates → ``[m]`` scores. ``columns=C`` (d = 1
            only): ``[m, C]`` candidates, one value per column → ``[m, C]`` scores, each column
            searched independently (per-channel / per-head scales), vectorised.
        top_k: survivors kept per level (per column).
        levels: total number of levels (level 1 = the coarse grid).
        eq_n: evaluations per refinement level: every survivor spawns m = eq_n // top_k points.
        integer_dims: dimensions rounded to integers (e.g. AdaLog's q).
        lower, upper: optional bounds (scalar or ``[d]``) new candidates are clamped to.
        tol: stop before ``levels`` once a level improves the best score (summed over columns) by
            no more than ``tol`` times its magnitude. ``None``: always run every level.

    Level 1 scores the coarse grid and keeps the ``top_k`` best. Each later level places m points
    around every survivor on a centred product grid: dimension j gets c_j points at offsets
    (t − (c_j − 1)/2) · δ_j / (c_j − 0.5), t = 0..c_j − 1, with ∏ c_j ≤ m. For d = 1, c = m (AdaLog's
    rule); for d ≥ 2 the c_j are as equal as possible and the leftover factor goes to the dimensions
    in turn, rotating every level (m = 8, d = 2: a 4 × 2 grid, then 2 × 4, …). After the level
    δ_j ← δ_j / (c_j − 0.5). Integer dimensions are rounded; once their δ is ≤ 1 they are no longer
    refined. New points are deduplicated and scored; the survivors stay in the pool with their
    scores, so the best score never decreases.

    Differences from the AdaLog code (documented choices): AdaLog spreads the m points over
    [−δ/2, δ/2] (spacing δ/(m − 1)) but carries δ/(m − 0.5) to the next level, and drops the
    survivors from the next pool; here the points are spaced exactly by the carried δ/(m − 0.5) and
    survivors are kept.

    Returns ``(survivors, scores)``, best first: ``[k, d]`` and ``[k]`` (``columns=None``) or
    ``[k, C]`` and ``[k, C]``; ``survivors[0]`` is the best candidate.
    """
    cands = torch.as_tensor(init_candidates)
    if not cands.is_floating_point():
        cands = cands.to(torch.float64)
    if cands.dim() == 1:
        cands = cands[:, None]
    if cands.dim() != 2 or cands.shape[0] == 0:
        raise ValueError(f'FPCS: init_candidates must be a non-empty [n, d] tensor, got '
                         f'{tuple(cands.shape)}')
    if top_k < 1 or levels < 1:
        raise ValueError('FPCS: top_k and levels must be >= 1')
    d = cands.shape[1]
    C = 1 if columns is None else int(columns)
    if C > 1 and d != 1:
        raise ValueError('FPCS: independent columns need one parameter per candidate (d = 1)')
    dtype, dev = cands.dtype, cands.device
    delta = torch.as_tensor(spacing, dtype=torch.float64).reshape(-1).expand(d).clone().abs()
    int_mask = torch.zeros(d, dtype=torch.bool)
    for j in integer_dims:
        int_mask[j] = True
    lo = None if lower is None else torch.as_tensor(lower, dtype=dtype, device=dev).expand(d)
    hi = None if upper is None else torch.as_tensor(upper, dtype=dtype, device=dev).expand(d)

    def fix(rows):
        if int_mask.any():
            rows = torch.where(int_mask.to(dev), torch.round(rows), rows)
        if lo is not None:
            rows = torch.maximum(rows, lo)
        if hi is not None:
            rows = torch.minimum(rows, hi)
        return rows

    def evaluate(rows):                       # (N, C, d) → (N, C) float64
        s = score_fn(rows[:, 0, :] if columns is None else rows[..., 0])
        s = torch.as_tensor(s).detach().to(torch.float64).cpu()
        s = s.reshape(rows.shape[0], C)
        return s

    cands = fix(cands)[:, None, :].expand(-1, C, -1).contiguous()
    surv, surv_s = _top(cands, evaluate(cands), top_k)
    m = max(1, eq_n // top_k)
    for level in range(1, levels):
        active = [j for j in range(d) if delta[j] > 0 and not (int_mask[j] and delta[j] <= 1)]
        counts = _grid_counts(m, active, level - 1)
        if all(c == 1 for c in counts.values()):
            break
        axes = []
        for j in range(d):
            c = counts.get(j, 1)
            if c == 1:
                axes.append(torch.zeros(1, dtype=torch.float64))
            else:
                step = delta[j] / (c - 0.5)
                axes.append((torch.arange(c, dtype=torch.float64) - (c - 1) / 2) * step)
        offsets = torch.cartesian_prod(*axes).reshape(-1, d).to(dtype=dtype, device=dev)
        new = fix((surv[:, None] + offsets[None, :, None, :]).reshape(-1, C, d))
        new, dup = _new_points(new, surv)
        prev = float(surv_s[0].sum())
        if new.shape[0] > 0:
            new_s = evaluate(new)
            if dup is not None:
                new_s[dup] = float('-inf')
            surv, surv_s = _top(torch.cat([surv, new]), torch.cat([surv_s, new_s]), top_k)
        for j, c in counts.items():
            if c > 1:
                delta[j] = delta[j] / (c - 0.5)
                if int_mask[j]:
                    delta[j] = max(float(delta[j]), 1.0)
        best = float(surv_s[0].sum())
        if tol is not None and not best - prev > tol * abs(prev):
            break
    if columns is None:
        return surv[:, 0, :], surv_s[:, 0]
    return surv[..., 0], surv_s
