"""Layer-wise quantizer search after calibration: PTQ4ViT (Hessian-guided grid) and AdaLog (FPCS).

``CalibrationRunner.run`` calls ``run_layer_search(model, spec, batches, forward_fn)`` once every
quantizer is calibrated and in 'quant' mode (reference §1.2, §1.3, §7).

Protocol (parallel, as in both papers)
--------------------------------------
1. **Capture** with every quantizer switched to 'float' (the float model), from at most
   ``images`` calibration images:

   * every searched ``QuantLinear`` / ``QuantConv2d``: a deterministic random subsample of its input
     rows (Conv: the input patches of sampled output positions), about ``max_rows / images`` rows
     per image and at most ``max_rows`` per module. Outputs are not stored: O = X·Wᵀ is recomputed.
     qkv / fc1 / patch-merging reductions have no input quantizer of their own: the output
     quantizer of the LayerNorm feeding them (``model.fqvit_reparam_pairs``) is searched with them.
   * every searched attention (``AttentionQuantizers``): the unquantized q, k, v (+ bias, mask) of
     the first ``attn_images`` images, through the ``_recorder`` hook of ``attend``. Queries are
     subsampled to ``attn_rows`` when longer (not with window masks, whose shape fixes N).
   * ``spec.search == 'hessian'``: in the same passes g = ∂L/∂(layer output) on the float model
     (``output_gradients`` with ``pseudo_label_loss``, sub-batches of ``grad_batch`` images; the
     gradients are multiplied by the sub-batch size, i.e. taken of the per-image loss), kept for
     the sampled rows only. If ``forward_fn`` does not return a tensor (detectors) the output-MSE
     metric is used instead, logged once.

2. **Search** every module on its own captured data (no quantization error from earlier layers
   reaches it), then ``module.refresh()``.

Metrics (higher is better)
--------------------------
* Linear / Conv, O = X·Wᵀ (float), Ô = q_in(X)·q_w(W)ᵀ (bias cancels):
  'hessian' → ``hessian_guided_score(O, Ô, g)`` = −mean((g ⊙ (O − Ô))²);
  'fpcs' (AdaLog) and detectors → −mean((O − Ô)²).
  Per-channel weight scales use the per-output-channel part of the same sum (an output channel's
  error depends on its own weight row only), so channels are chosen independently.
* Attention, always MSE (documented choice): every step is decided on the attention-output error
  P̂·v̂ − P·v (per head for per-head quantizers). q and k are *searched* on the logits error
  scale·(q̂k̂ᵀ − qkᵀ) (an unquantized bias / mask is additive and cancels) and their ``confirm``
  best candidates are then compared with the current scale on the output error: the logits MSE
  alone can raise the output error (it weighs all logits alike, softmax does not; measured on
  DeiT-Tiny block 0: ×1.6). ``attn_qk='output'`` searches q, k on the output error directly.
  probs and v are searched on the output error.

Errors are evaluated in "difference form" (e.g. Ô − O = (X̂ − X)·Ŵᵀ + X·(Ŵ − W)ᵀ) so nothing
cancels catastrophically, and for MSE through Gram matrices when that is cheaper (exact: e.g.
Σ‖D·Ŵᵀ + E‖² = Σ D·(ŴᵀŴ)·Dᵀ + 2⟨D, E·Ŵ⟩ + ‖E‖²).

Candidates
----------
* ``UniformQuantizer``: candidate α maps to the range [α·min, α·max] of the range calibrated
  before the search (min/max recovered from scale and zero point) through ``scale_zero_point``;
  symmetric: Δ = α·Δ₀. 'hessian' (PTQ4ViT): α from ``ptq4vit_candidates`` (0.01 … 1.2, n = 100,
  101 values). 'fpcs' (AdaLog): FPCS over α, a coarse grid of ``eq_n`` values in
  [``alpha_min``, ``alpha_max``], ``top_k`` survivors, at most ``levels`` levels (the d = 1 rule
  of ``fast_progressive_combining_search``, vectorised in ``_fpcs_columns`` so per-channel /
  per-head scales run one FPCS per channel). Weight scales are per output channel when the
  quantizer is (``ch_axis=0``); activation scales share one α (per-head q/k/v: one per head).
* ``TwinUniformSoftmaxQuantizer``: split exponent in ``candidate_exps()`` (0 … 19);
  ``TwinUniformGeluQuantizer``: m ∈ −5 … 24 (grids, both methods).
* ``AdaLogQuantizer``: post-softmax (Δ fixed): q over ``adalog_base_candidates()`` (10 … 137, an
  integer FPCS, i.e. the full grid); post-GELU (shift ≠ 0) or ``search_scale``: (Δ, q) with
  ``fast_progressive_combining_search`` from a 16 × 8 grid, Δ ∈ [0.25, 1.2]·max(x + η),
  q ∈ 8 values of 10 … 137. Scored with ``subtract_shift=True`` (a folded fc2 bias makes both
  equal).
* Not searched: Log2, LogSqrt2, LogIntSoftmax, PTF, ``None``.

Every step also scores the current parameters, which win ties, so a module's score never
decreases. Rounds alternate (weight, input) for Linear / Conv and (q, k, probs, v) for attention,
``rounds`` times, stopping early when a round changes nothing.

Cost controls (CPU; documented deviations from the papers' exhaustive GPU searches)
----------------------------------------------------------------------------------------------
* ``screen_rows`` (256): candidates are scored on a subset of this many rows (MSE: evenly spaced;
  'hessian': the rows with the largest Σ_c g², which on DeiT-Tiny hold ~97 % of the Fisher weight
  in 1/8 of the rows); the ``confirm`` (4) best and the current parameters are then compared on
  all captured rows, which make the decision. Attention screens on the first quarter of the captured rows. 0 = off.
  (Weight steps whose all-row error goes through the Gram matrix, cost independent of the rows,
  are not screened.)
* ``fpcs_tol`` (1e-3): FPCS stops before ``levels`` once a level improves the best score by no
  more than this fraction (AdaLog refines α to ~1e-7; on DeiT-Tiny levels beyond 2–3 changed
  the layer error by < 0.01 %). 0 = always ``levels`` levels.
* ``chunk_elems``: candidate batches are sized so each intermediate has about this many elements.

``spec.search_cfg`` keys (defaults in ``DEFAULTS``): images, max_rows, rounds, attn_images,
attn_rows, grad_batch, alpha_min, alpha_max, grid_n (PTQ4ViT n), eq_n, top_k, levels, fpcs_tol,
screen_rows, confirm, attn_qk ('logits' | 'output'), chunk_elems, seed (row sampling).

Not handled (logged, left as calibrated): grouped convolutions, Linear inputs whose per-channel
quantizer axis is not the feature axis. Per-channel logits / probability quantizers are applied
at their current parameters only on unbatched layouts (the presets use per-tensor ones).
"""
import logging
import math
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn.modules import AttentionQuantizers, QuantConv2d, QuantLinear
from .quantizers.adalog import (ADALOG_Q_MAX, ADALOG_Q_MIN, AdaLogQuantizer,
                                adalog_base_candidates)
from .quantizers.base import MIN_SCALE, Quantizer
from .quantizers.search import (fast_progressive_combining_search, hessian_guided_score,
                                output_gradients, pseudo_label_loss, ptq4vit_candidates)
from .quantizers.twin import (TwinUniformGeluQuantizer, TwinUniformSoftmaxQuantizer,
                              twin_gelu_fake_quant, twin_softmax_fake_quant)
from .quantizers.uniform import UniformQuantizer, scale_zero_point

logger = logging.getLogger('fqvit_det')

DEFAULTS = dict(images=32, max_rows=2048, rounds=3, attn_images=4, attn_rows=256, grad_batch=8,
                alpha_min=0.01, alpha_max=1.2, grid_n=100, eq_n=128, top_k=16, levels=6,
                fpcs_tol=1e-3, screen_rows=256, confirm=4, attn_qk='logits', chunk_elems=1 << 24,
                seed=0)
_POSITIVE_INTS = ('images', 'max_rows', 'rounds', 'attn_rows', 'grad_batch', 'grid_n', 'eq_n',
                  'top_k', 'levels', 'confirm', 'chunk_elems')
ALPHA_FLOOR = 1e-4          # FPCS lower bound for α (a scale must stay positive)
ADALOG_GELU_GRID = (16, 8)  # (Δ values, q values) of the post-GELU coarse grid
ATTN_SCREEN_FRAC = 0.25     # attention candidates are screened on this share of the captured rows


def search_config(spec) -> dict:
    """``DEFAULTS`` overridden by ``spec.search_cfg``; unknown keys and bad values raise."""
    cfg = dict(DEFAULTS)
    for key, value in (getattr(spec, 'search_cfg', None) or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f'quant_cfg.search_cfg.{key}: unknown key; expected one of '
                             f'{sorted(DEFAULTS)}')
        cfg[key] = value
    for key in _POSITIVE_INTS:
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f'quant_cfg.search_cfg.{key} must be a positive int, got {v!r}')
    v = cfg['screen_rows']
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f'quant_cfg.search_cfg.screen_rows must be an int >= 0, got {v!r}')
    v = cfg['attn_images']
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f'quant_cfg.search_cfg.attn_images must be an int >= 0, got {v!r}')
    if not 0 < float(cfg['alpha_min']) < float(cfg['alpha_max']):
        raise ValueError('quant_cfg.search_cfg: need 0 < alpha_min < alpha_max, got '
                         f'{cfg["alpha_min"]!r}, {cfg["alpha_max"]!r}')
    if not isinstance(cfg['fpcs_tol'], (int, float)) or cfg['fpcs_tol'] < 0:
        raise ValueError(f'quant_cfg.search_cfg.fpcs_tol must be a number >= 0, got {cfg["fpcs_tol"]!r}')
    if cfg['attn_qk'] not in ('output', 'logits'):
        raise ValueError(f'quant_cfg.search_cfg.attn_qk must be "output" or "logits", got '
                         f'{cfg["attn_qk"]!r}')
    if not isinstance(cfg['seed'], int):
        raise ValueError(f'quant_cfg.search_cfg.seed must be an int, got {cfg["seed"]!r}')
    return cfg


# =================================================================================================
# Batches
# =================================================================================================
def _batch_size(batch) -> Optional[int]:
    """Images in a calibration batch, when it can be told from its structure."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, dict):
        inp = batch.get('inputs')
        if torch.is_tensor(inp) and inp.dim() > 0:
            return int(inp.shape[0])
        if isinstance(inp, (list, tuple)):
            return len(inp)
        return None
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]) \
            and batch[0].dim() >= 2:
        return int(batch[0].shape[0])       # (images, labels)
    return None


def _slice_batch(batch, start: int, stop: int, total: int):
    """Images [start, stop) of a batch of ``total``: tensors and lists of length ``total`` are
    sliced, dicts and tuples recursed into, anything else is shared."""
    if torch.is_tensor(batch):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == total else batch
    if isinstance(batch, dict):
        return type(batch)((k, _slice_batch(v, start, stop, total)) for k, v in batch.items())
    if isinstance(batch, list):
        if len(batch) == total:
            return batch[start:stop]
        return [_slice_batch(v, start, stop, total) for v in batch]
    if isinstance(batch, tuple):
        return tuple(_slice_batch(v, start, stop, total) for v in batch)
    return batch


def _output_count(out) -> int:
    if torch.is_tensor(out):
        return int(out.shape[0]) if out.dim() > 0 else 1
    if isinstance(out, (list, tuple)):
        return len(out)
    return 1


# =================================================================================================
# Candidate spaces: a quantizer's candidate parameters as tensors with a leading candidate dim
# =================================================================================================
def _pview(p: torch.Tensor, ndim: int, axis: Optional[int], repeat: int = 1) -> torch.Tensor:
    """Parameters (n,) or (n, C) → broadcastable against candidate data (n, *data), data.dim()=ndim,
    with C on ``axis`` of the data (each entry repeated ``repeat`` times: conv patch columns)."""
    n = p.shape[0]
    if p.dim() == 1 or axis is None:
        return p.reshape(n, *([1] * ndim))
    if repeat > 1:
        p = p.repeat_interleave(repeat, dim=1)
    shape = [n] + [1] * ndim
    shape[1 + axis] = p.shape[1]
    return p.reshape(shape)


def _take(p, idx):
    return tuple(t[idx] for t in p)


def _cat(*ps):
    return tuple(torch.cat(ts) for ts in zip(*ps))


class _Space:
    """Candidates of one quantizer applied to data with ``ndim`` dims (channels on ``axis``)."""
    per_channel = False
    channels = 1

    def __init__(self, q: Quantizer, ndim: int, axis: Optional[int] = None, repeat: int = 1):
        self.q, self.ndim, self.axis, self.repeat = q, ndim, axis, repeat

    def current(self):
        raise NotImplementedError

    def fq(self, x: torch.Tensor, p) -> torch.Tensor:
        """Fake-quantize ``x`` with every candidate in ``p``: (n, *x.shape)."""
        raise NotImplementedError

    def apply(self, p) -> None:
        raise NotImplementedError

    def apply_current(self, x):
        return self.fq(x, self.current())[0]


class _UniformSpace(_Space):
    """α ↦ range [α·min₀, α·max₀] of the pre-search calibrated range (symmetric: Δ = α·Δ₀)."""

    def __init__(self, q: UniformQuantizer, ndim, axis=None, repeat=1, per_channel=False):
        super().__init__(q, ndim, axis if q.scale.dim() == 1 else None, repeat)
        self.s0 = q.scale.detach().float().clone()
        z0 = q.zero_point.detach().float().clone()
        self.per_channel = bool(per_channel and self.s0.dim() == 1 and self.s0.numel() > 1)
        self.channels = self.s0.numel() if self.per_channel else 1
        if not q.symmetric:
            self.min0 = (q.qmin - z0) * self.s0
            self.max0 = (q.qmax - z0) * self.s0

    def from_alpha(self, a: torch.Tensor):
        """α (n,) shared by all channels, or (n, C) one per channel → (scale, zero_point)."""
        q = self.q
        a = a.to(device=self.s0.device, dtype=torch.float32)
        n = a.shape[0]
        if a.dim() == 1:
            a = a.reshape(n, *([1] * self.s0.dim()))
        if q.symmetric:
            s = (a * self.s0).clamp(min=MIN_SCALE)
            z = torch.zeros_like(s)
        else:
            s, z = scale_zero_point(a * self.min0, a * self.max0, q.bits, False, q.signed)
        shape = (n, *self.s0.shape)
        return s.expand(shape).contiguous(), z.expand(shape).contiguous()

    def current(self):
        return (self.q.scale.detach().float()[None].clone(),
                self.q.zero_point.detach().float()[None].clone())

    def fq(self, x, p):
        """(clamp(⌊x/Δ⌉ + z, qmin, qmax) − z)·Δ, as ``UniformQuantizer.fake_quant``, for every
        candidate. Integer zero points use PyTorch's fused fake-quantization kernel (one pass;
        it multiplies by 1/Δ, which can move a value lying exactly on a rounding tie by one
        step), others the elementwise formula."""
        s, z = p
        n = s.shape[0]
        if self.repeat == 1 and (s.dim() == 1 or self.axis is not None) \
                and bool(torch.equal(z, torch.round(z))):
            # candidates × channels become the channel axis of one fused call
            if s.dim() == 1:
                xe = x.unsqueeze(0).expand(n, *x.shape).reshape(n, -1)
                xt = x
            else:
                xt = x.movedim(self.axis, 0)
                xe = xt.unsqueeze(0).expand(n, *xt.shape).reshape(n * xt.shape[0], -1)
                s, z = s.reshape(-1), z.reshape(-1)
            out = torch.fake_quantize_per_channel_affine(
                xe.float(), s.float().contiguous(), z.to(torch.int32).contiguous(), 0,
                self.q.qmin, self.q.qmax).reshape(n, *xt.shape)
            return out if xt is x else out.movedim(1, self.axis + 1)
        sv = _pview(s, self.ndim, self.axis, self.repeat)
        t = torch.round(x / sv)
        if self.q.symmetric:
            return t.clamp_(self.q.qmin, self.q.qmax).mul_(sv)
        zv = _pview(z, self.ndim, self.axis, self.repeat)
        return t.add_(zv).clamp_(self.q.qmin, self.q.qmax).sub_(zv).mul_(sv)

    def apply(self, p):
        self.q.set_params(p[0][0], p[1][0])


class _ExpSpace(_Space):
    """PTQ4ViT twin uniform: one integer exponent (softmax split i, or GELU m)."""

    def __init__(self, q, ndim):
        super().__init__(q, ndim)
        if isinstance(q, TwinUniformSoftmaxQuantizer):
            self.fn, self.attr = twin_softmax_fake_quant, 'split_exp'
        else:
            self.fn, self.attr = twin_gelu_fake_quant, 'pos_exp'

    def grid(self):
        return (torch.tensor(self.q.candidate_exps(), dtype=torch.int64),)

    def current(self):
        return (getattr(self.q, self.attr).detach().reshape(1).to(torch.int64).cpu().clone(),)

    def fq(self, x, p):
        e = p[0].to(x.device).reshape(-1, *([1] * self.ndim))
        return self.fn(x, e, self.q.bits)

    def apply(self, p):
        self.q.set_params(int(p[0][0]))


class _AdaLogSpace(_Space):
    """AdaLog: (Δ, q); Δ stays fixed unless the quantizer searches it (post-GELU).

    Candidates are scored with log2(x + η) computed once per data tensor and a per-candidate
    (2^b)-entry table Δ·2^(−⌊c·q/r⌋)·T̂[(c·q) mod r] (the LUT dequantization of every code c):
    code c = ⌊(log2 Δ − log2(x + η))·r/q⌉, an algebraically equal form of the quantizer's
    ⌊−log2((x + η)/Δ)·r/q⌉ (it may differ by one code at exact rounding ties)."""

    def __init__(self, q: AdaLogQuantizer, ndim):
        super().__init__(q, ndim)
        self.two_d = q.searches_delta
        self.top = max(float(q.delta), MIN_SCALE)     # Δ grid scale; callers set max(x + η)
        self._key, self._log = None, None

    def current(self):
        return (self.q.delta.detach().float().reshape(1).cpu().clone(),
                self.q.q.detach().reshape(1).to(torch.int64).cpu().clone())

    def _log2(self, x):
        if self._key is not x:
            xs = x.float() + self.q.shift if self.q.shift else x.float()
            self._key, self._log = x, torch.log2(xs)
        return self._log

    def fq(self, x, p):
        q = self.q
        n, levels = p[0].shape[0], 2 ** q.bits
        shape = (n, *([1] * self.ndim))
        delta = p[0].to(device=x.device, dtype=torch.float32)
        qi = p[1].to(x.device).to(torch.int64)
        if bool((qi <= 0).any()):
            raise ValueError(f'AdaLog: q must be positive, got {qi}')
        e = torch.arange(levels, device=x.device)[None, :] * qi[:, None]          # (n, 2^b)
        hi = torch.div(e, q.r, rounding_mode='floor')
        tab = torch.exp2(-hi.to(torch.float32)) * q.lut.to(x.device)[e - hi * q.r]
        # entry 2^b = the zero code; the shift η is folded into the table
        tab = torch.cat([tab * delta[:, None], torch.zeros(n, 1, device=x.device)], dim=1)
        if q.shift:
            tab -= q.shift
        c = torch.log2(delta).reshape(shape) - self._log2(x)
        c.mul_((q.r / qi.to(torch.float32)).reshape(shape)).round_()
        # codes ≥ 2^b (and NaN: x + η < 0) → the zero entry
        idx = c.nan_to_num_(nan=float(levels)).clamp_(0, levels).to(torch.int64)
        idx += (torch.arange(n, device=x.device) * (levels + 1)).reshape(shape)
        return tab.reshape(-1).take(idx)

    def apply(self, p):
        self.q.set_params(delta=float(p[0][0]), q=int(p[1][0]))


def _active(q) -> bool:
    return q is not None and q.mode == 'quant' and bool(q.calibrated)


def _searchable_type(q) -> bool:
    return isinstance(q, (UniformQuantizer, TwinUniformSoftmaxQuantizer, TwinUniformGeluQuantizer,
                          AdaLogQuantizer))


# =================================================================================================
# Search of one quantizer. A "step" scores candidates: step.scores(p) -> (n, channels), higher is
# better.
# =================================================================================================
def _nan_low(s: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(s, nan=float('-inf'))


def _top_cols(rows, scores, k):
    order = torch.sort(_nan_low(scores), dim=0, descending=True, stable=True).indices[:k]
    return torch.gather(rows, 0, order), torch.gather(scores, 0, order)


def _improved(new: float, old: float, tol: float) -> bool:
    return new - old > tol * abs(old)


def _fpcs_columns(init, spacing, score_fn, channels, top_k, levels, eq_n, lower, tol=0.0):
    """``fast_progressive_combining_search`` for d = 1, run independently for ``channels`` columns
    whose scores are independent (per-output-channel / per-head scales), vectorised: candidate rows
    are (m, C), one value per column, ``score_fn`` returns (m, C). Same grid rule as the library
    (m = eq_n // top_k points per survivor at offsets (t − (m−1)/2)·δ/(m − 0.5), survivors kept,
    δ ← δ/(m − 0.5)). Stops before ``levels`` once a level improves the summed best score by no
    more than ``tol`` (relative). Returns the final survivors, best first: (top_k, C)."""
    init = init.to(torch.float64)
    cands = init.reshape(-1, 1).expand(-1, channels).contiguous()
    scores = score_fn(cands)
    surv, surv_s = _top_cols(cands, scores, top_k)
    m = max(1, eq_n // top_k)
    delta = float(spacing)
    for _ in range(1, levels):
        if m < 2:
            break
        prev = float(surv_s[0].sum())
        step = delta / (m - 0.5)
        offs = (torch.arange(m, dtype=torch.float64) - (m - 1) / 2) * step
        offs = offs[offs != 0]
        new = (surv[:, None, :] + offs[None, :, None]).reshape(-1, channels).clamp(min=lower)
        pool = torch.cat([surv, new])
        pool_s = torch.cat([surv_s, score_fn(new)])
        surv, surv_s = _top_cols(pool, pool_s, top_k)
        delta = step
        if not _improved(float(surv_s[0].sum()), prev, tol):
            break
    return surv


def _fpcs(init, spacing, score_fn, cfg, integer_dims=(), lower=None):
    """``fast_progressive_combining_search`` with the level count grown one at a time (scores are
    memoised, so every candidate is scored once) until a level improves the best score by no more
    than ``fpcs_tol`` (relative) or ``levels`` is reached. Returns the memo {candidate bytes:
    score} of every scored candidate."""
    cache: Dict[bytes, float] = {}

    def cached(a):
        a = a.detach().to(torch.float64).cpu()
        keys = [r.numpy().tobytes() for r in a]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        if todo:
            for i, v in zip(todo, score_fn(a[todo]).tolist()):
                cache[keys[i]] = v
        return torch.tensor([cache[k] for k in keys], dtype=torch.float64)

    prev = None
    for levels in range(1, cfg['levels'] + 1):
        _, score = fast_progressive_combining_search(
            init, spacing, cached, top_k=cfg['top_k'], levels=levels, eq_n=cfg['eq_n'],
            integer_dims=integer_dims, lower=lower)
        score = float(score)
        if prev is not None and not _improved(score, prev, cfg['fpcs_tol']):
            break
        prev = score
    return cache


def _pick_columns(space, cand, scores):
    """Per channel, the best candidate row (ties → the earliest row)."""
    idx = torch.argmax(_nan_low(scores), dim=0).to(cand[0].device)
    cols = torch.arange(scores.shape[1], device=cand[0].device)
    return tuple(t[idx, cols][None] for t in cand)


def _same(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def search_quantizer(space: _Space, step, method: str, cfg: dict, screen=None) -> bool:
    """One coordinate step: choose ``space.q``'s parameters by ``step``; True if they changed.

    ``method``: 'grid' (PTQ4ViT grids) or 'fpcs' (AdaLog). With ``screen`` (the same error on a
    subset of the rows) the grid / FPCS runs on ``screen`` and its ``confirm`` best candidates are
    re-scored with ``step`` (all rows) together with the current parameters; otherwise the search
    runs on ``step`` directly. The current parameters are always a candidate and win ties."""
    cur = space.current()
    search = screen if screen is not None else step
    k = cfg['confirm'] if screen is not None else 1

    def total(p, st=search):
        return st.scores(p).sum(dim=1)

    def top_rows(cand, scores):          # the k best candidates (per channel when per-channel)
        if space.per_channel:
            idx = torch.sort(_nan_low(scores), dim=0, descending=True, stable=True).indices[:k]
            idx = idx.to(cand[0].device)
            return tuple(torch.gather(t, 0, idx) for t in cand)
        order = torch.sort(_nan_low(scores.sum(dim=1)), descending=True, stable=True).indices[:k]
        return _take(cand, order.to(cand[0].device))

    def from_cache(cache, to_params):    # memoised FPCS candidates → the k best
        keys = sorted(cache, key=lambda key: -cache[key] if cache[key] == cache[key] else math.inf)
        rows = torch.stack([torch.frombuffer(bytearray(key), dtype=torch.float64)
                            for key in keys[:k]])
        return to_params(rows)

    if isinstance(space, _UniformSpace):
        if method == 'grid':
            alphas = ptq4vit_candidates(torch.tensor(1.0, dtype=torch.float64), cfg['alpha_min'],
                                        cfg['alpha_max'], cfg['grid_n'])
            cand = _cat(cur, space.from_alpha(alphas))
            shortlist = top_rows(cand, search.scores(cand))
        else:
            a0, a1, n = float(cfg['alpha_min']), float(cfg['alpha_max']), cfg['eq_n']
            init = torch.linspace(a0, a1, n, dtype=torch.float64)
            spacing = (a1 - a0) / max(n - 1, 1)
            if space.per_channel:
                fn, channels = (lambda a: search.scores(space.from_alpha(a))), space.channels
            else:
                fn, channels = (lambda a: total(space.from_alpha(a[:, 0]))[:, None]), 1
            surv = _fpcs_columns(init, spacing, fn, channels, cfg['top_k'], cfg['levels'], n,
                                 ALPHA_FLOOR, cfg['fpcs_tol'])[:k]
            shortlist = space.from_alpha(surv if space.per_channel else surv[:, 0])
    elif isinstance(space, _ExpSpace):
        cand = _cat(cur, space.grid())
        shortlist = top_rows(cand, search.scores(cand))
    elif isinstance(space, _AdaLogSpace):
        if not space.two_d:
            d = cur[0]

            def params_q(a):
                return (d.expand(a.shape[0]).clone(), torch.round(a[:, 0]).to(torch.int64))
            cache = _fpcs(adalog_base_candidates().to(torch.float64), 1.0,
                          lambda a: total(params_q(a)), cfg, integer_dims=(0,), lower=1.0)
            shortlist = from_cache(cache, params_q)
        else:
            nd, nq = ADALOG_GELU_GRID
            ds = torch.linspace(0.25, 1.2, nd, dtype=torch.float64) * space.top
            qv = torch.round(torch.linspace(ADALOG_Q_MIN, ADALOG_Q_MAX, nq, dtype=torch.float64))

            def params_dq(a):
                return (a[:, 0].float().clamp(min=MIN_SCALE), torch.round(a[:, 1]).to(torch.int64))
            cache = _fpcs(torch.cartesian_prod(ds, qv), [float(ds[1] - ds[0]), float(qv[1] - qv[0])],
                          lambda a: total(params_dq(a)), cfg, integer_dims=(1,),
                          lower=[MIN_SCALE, 1.0])
            shortlist = from_cache(cache, params_dq)
    else:  # pragma: no cover - filtered by _searchable_type
        return False
    full = _cat(cur, tuple(t.to(c.device) for t, c in zip(shortlist, cur)))
    scores = step.scores(full)
    if space.per_channel:
        best = _pick_columns(space, full, scores)
    else:
        i = int(torch.argmax(_nan_low(scores.sum(dim=1))))
        best = _take(full, slice(i, i + 1))
    if _same(best, cur):
        return False
    space.apply(best)
    return True


def _chunks(n: int, per_candidate: int, budget: int):
    step = max(1, budget // max(per_candidate, 1))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


# =================================================================================================
# Capture
# =================================================================================================
class _RowCapture:
    """Forward hook of a Linear / Conv: keeps a random subsample of input rows (Conv: patches)."""

    def __init__(self, mod: nn.Module, index: int, seed: int):
        self.mod, self.index, self.seed = mod, index, seed
        self.is_conv = isinstance(mod, nn.Conv2d)
        self.quota = 1
        self.xs: List[torch.Tensor] = []
        self.gs: List[torch.Tensor] = []
        self.pending: List[torch.Tensor] = []
        self.want_grad = False
        self.calls = 0
        self.in_ndim = None

    def _choose(self, total: int, device) -> torch.Tensor:
        if total <= self.quota:
            return torch.arange(total, device=device)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index * 7919 + self.calls)
        return torch.randperm(total, generator=g)[:self.quota].sort().values.to(device)

    def hook(self, mod, args, out):
        x = args[0].detach()
        with torch.no_grad():
            if self.in_ndim is None:
                self.in_ndim = x.dim()
            if self.is_conv:
                if x.dim() == 3:
                    x, out = x.unsqueeze(0), out.unsqueeze(0)
                b, _, oh, ow = out.shape
                idx = self._choose(b * oh * ow, x.device)
                rows = self._patches(x, idx, oh, ow)
            else:
                flat = x.reshape(-1, x.shape[-1])
                idx = self._choose(flat.shape[0], x.device)
                rows = flat[idx]
            self.xs.append(rows.float().clone())
        if self.want_grad:
            self.pending.append(idx)
        self.calls += 1

    def _patches(self, x, idx, oh, ow):
        m = self.mod
        if m.padding_mode == 'zeros':
            xp = F.pad(x, m._reversed_padding_repeated_twice)
        else:
            xp = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        kh, kw = m.kernel_size
        sh, sw = m.stride
        dh, dw = m.dilation
        b = idx // (oh * ow)
        rem = idx % (oh * ow)
        hi = (rem // ow)[:, None] * sh + torch.arange(kh, device=x.device) * dh
        wi = (rem % ow)[:, None] * sw + torch.arange(kw, device=x.device) * dw
        p = xp[b[:, None, None], :, hi[:, :, None], wi[:, None, :]]   # (R, kh, kw, C)
        return p.permute(0, 3, 1, 2).reshape(idx.shape[0], -1)

    def add_grads(self, grads: List[torch.Tensor], factor: float):
        if len(grads) != len(self.pending):
            raise RuntimeError('gradient / call count mismatch')
        for idx, g in zip(self.pending, grads):
            g = g.detach()
            if self.is_conv:
                if g.dim() == 3:
                    g = g.unsqueeze(0)
                g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
            else:
                g = g.reshape(-1, g.shape[-1])
            self.gs.append((g[idx] * factor).float().clone())
        self.pending = []

    def result(self, max_rows: int, with_grads: bool):
        X = torch.cat(self.xs) if self.xs else None
        G = torch.cat(self.gs) if with_grads and self.gs else None
        if X is not None and X.shape[0] > max_rows:
            keep = torch.linspace(0, X.shape[0] - 1, max_rows).round().long().to(X.device)
            X = X[keep]
            G = None if G is None else G[keep]
        self.xs, self.gs = [], []
        return X, G


class _AttnRecorder:
    """``AttentionQuantizers._recorder``: keeps the float operands of the first images."""

    def __init__(self, max_queries: int, seed: int, index: int):
        self.records: List[dict] = []
        self.frac = 0.0
        self.max_queries, self.seed, self.index = max_queries, seed, index

    def __call__(self, aq, q, k, v, scale, bias, mask, mask_fn):
        if self.frac <= 0:
            return
        with torch.no_grad():
            B = q.shape[0]
            rows = min(B, math.ceil(B * self.frac - 1e-9))
            if mask is not None and mask_fn is not None and mask.dim() >= 1:
                nw = mask.shape[0]
                rows = min(B, -(-rows // nw) * nw)
            n = q.shape[-2]
            qidx = None
            if n > self.max_queries and mask_fn is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index * 7919
                                                  + len(self.records))
                qidx = torch.randperm(n, generator=g)[:self.max_queries].sort().values.to(q.device)

            def rows_of(t):
                return t[:rows].detach().float().clone()
            rec = dict(q=rows_of(q), k=rows_of(k), v=rows_of(v), scale=scale, mask_fn=mask_fn,
                       bias=None if bias is None else bias.detach().float().clone(), mask=None)
            if mask is not None:
                mk = mask.detach()
                if mask_fn is None and mk.dim() == 4 and mk.shape[0] == B:
                    mk = mk[:rows]
                rec['mask'] = mk.clone()
            if qidx is not None:
                rec['q'] = rec['q'][:, :, qidx]
                if rec['bias'] is not None and rec['bias'].dim() >= 2 and rec['bias'].shape[-2] == n:
                    rec['bias'] = rec['bias'][..., qidx, :]
                if rec['mask'] is not None and rec['mask'].dim() >= 2 and rec['mask'].shape[-2] == n:
                    rec['mask'] = rec['mask'][..., qidx, :]
            self.records.append(rec)


class _NonTensorOutput(Exception):
    def __init__(self, count):
        super().__init__('model output is not a tensor')
        self.count = count


class _ForwardFn(nn.Module):
    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def _capture(model, lin_mods, attn_mods, batches, forward_fn, cfg, hessian):
    """Float-model capture. Returns ({mod: (X, G)}, {aq: [records]}, metric, images)."""
    from .walk import named_quantizers, refresh, set_quant_mode
    caps = {m: _RowCapture(m, i, cfg['seed']) for i, m in enumerate(lin_mods)}
    recs = {a: _AttnRecorder(cfg['attn_rows'], cfg['seed'], i) for i, a in enumerate(attn_mods)}
    images, attn_images = cfg['images'], cfg['attn_images']
    use_grad = bool(hessian and lin_mods)
    metric = 'hessian' if hessian else 'mse'
    saved_modes = [(q, q.mode) for _, q in named_quantizers(model)]
    was_training = model.training
    handles = [m.register_forward_hook(c.hook) for m, c in caps.items()]
    for a, r in recs.items():
        a._recorder = r
    wrapper = _ForwardFn(model, forward_fn)
    params = [p for p in model.parameters() if p.is_floating_point()]
    saved_req = [p.requires_grad for p in params]

    state = dict(count=None)

    def loss_fn(outputs, ref):
        state['count'] = _output_count(outputs)
        if not torch.is_tensor(outputs):
            raise _NonTensorOutput(_output_count(outputs))
        return pseudo_label_loss(outputs, ref)

    def run_piece(piece, count):
        nonlocal use_grad, metric
        share = count if count is not None else images
        for c in caps.values():
            c.quota = max(1, math.ceil(cfg['max_rows'] * share / images))
            c.want_grad = use_grad
            c.pending = []
        if use_grad:
            leaf = torch.is_tensor(piece) and piece.is_floating_point()
            for p in params:
                p.requires_grad_(not leaf)
            try:
                grads = output_gradients(wrapper, (piece,), list(caps), loss_fn=loss_fn)
                n = count if count is not None else state['count']
                for m, c in caps.items():
                    c.add_grads(grads[m], float(n))
                return n
            except _NonTensorOutput as err:
                logger.info('layer search: the model output is not a tensor (a detector?); using '
                            'the layer-output MSE instead of the Hessian-guided metric')
                use_grad, metric = False, 'mse'
                return count if count is not None else err.count
            except RuntimeError as err:
                logger.warning('layer search: output gradients unavailable (%s); using the '
                               'layer-output MSE instead of the Hessian-guided metric', err)
                use_grad, metric = False, 'mse'
                return count if count is not None else 1
            finally:
                for p, r in zip(params, saved_req):
                    p.requires_grad_(r)
        with torch.no_grad():
            out = forward_fn(model, piece)
        return count if count is not None else _output_count(out)

    try:
        set_quant_mode(model, 'float')
        model.eval()
        seen = 0
        for batch in batches:
            if seen >= images:
                break
            n = _batch_size(batch)
            if n is None:
                pieces = [(batch, None)]
            else:
                take = min(n, images - seen)
                step = cfg['grad_batch'] if use_grad else take
                pieces = []
                for s in range(0, take, step):
                    e = min(take, s + step)
                    pieces.append((batch if (s == 0 and e == n) else
                                   _slice_batch(batch, s, e, n), e - s))
            for piece, count in pieces:
                left = attn_images - seen
                for r in recs.values():
                    r.frac = (min(1.0, left / count) if count else 1.0) if left > 0 else 0.0
                seen += run_piece(piece, count)
        if seen == 0:
            raise ValueError('layer search received no calibration batches')
    finally:
        for h in handles:
            h.remove()
        for a in recs:
            a.__dict__.pop('_recorder', None)
        for q, mode in saved_modes:
            q.mode = mode
        refresh(model)
        model.train(was_training)
    rows = {m: c.result(cfg['max_rows'], metric == 'hessian') for m, c in caps.items()}
    for m, c in caps.items():
        rows[m] = rows[m] + (c.in_ndim,)
    return rows, {a: r.records for a, r in recs.items()}, metric, seen


# =================================================================================================
# Linear / Conv
# =================================================================================================
class _Step:
    """Scores of one search step: ``scores(params) -> (n, channels)``, higher is better."""

    def __init__(self, scores: Callable):
        self.scores = scores


class _LinearProblem:
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
        if _active(wq):
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

    def weight_step(self, rows=None) -> _Step:
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
                for sl in _chunks(p[0].shape[0], 3 * C * K, self.budget):
                    dW = space.fq(W, _take(p, sl)).sub_(W)      # (m, C, K)
                    # Δw·Gx·Δwᵀ + 2Δw·h + c0 per channel
                    err = torch.linalg.vecdot(torch.matmul(dW, Gx).add_(H, alpha=2), dW) + c0
                    out.append(-err.double() / norm)
                return torch.cat(out)
            return _Step(scores)

        def scores(p):                                          # (m, C)
            out = []
            for sl in _chunks(p[0].shape[0], C * K + 2 * R * C, self.budget):
                dW = space.fq(W, _take(p, sl)).sub_(W)
                E = torch.matmul(Xh, dW.transpose(1, 2)).add_(E0)   # (m, R, C)
                if G is not None:
                    E.mul_(G)
                out.append(-E.pow_(2).sum(1).double() / norm)
            return torch.cat(out)
        return _Step(scores)

    def input_step(self, rows=None) -> _Step:
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
                for sl in _chunks(p[0].shape[0], 3 * R * K, self.budget):
                    D = space.fq(X, _take(p, sl)).sub_(X)       # (m, R, K)
                    err = ((D @ M) * D).sum((1, 2)) + 2 * (D * T).sum((1, 2)) + c
                    out.append(-err.double() / norm)
                return torch.cat(out)[:, None]
            return _Step(scores)
        WhT = Wh.t().contiguous()

        def scores(p):                                          # (m, 1)
            out = []
            for sl in _chunks(p[0].shape[0], R * (K + 2 * C), self.budget):
                D = space.fq(X, _take(p, sl)).sub_(X)
                E = torch.matmul(D, WhT).add_(Ew)               # (m, R, C)
                if G is not None:
                    E.mul_(G)
                out.append(-E.pow_(2).sum((1, 2)).double() / norm)
            return torch.cat(out)[:, None]
        return _Step(scores)


def _row_layout(q, mod, in_ndim):
    """(axis, repeat) placing an input quantizer's channels on X's columns, or None if impossible."""
    ch = getattr(q, 'ch_axis', None)
    if ch is None or (isinstance(q, UniformQuantizer) and q.scale.dim() == 0):
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


def _make_space(q, ndim, axis=None, repeat=1, per_channel=False):
    if isinstance(q, UniformQuantizer):
        return _UniformSpace(q, ndim, axis, repeat, per_channel)
    if isinstance(q, (TwinUniformSoftmaxQuantizer, TwinUniformGeluQuantizer)):
        return _ExpSpace(q, ndim)
    if isinstance(q, AdaLogQuantizer):
        return _AdaLogSpace(q, ndim)
    return None


def _weight_space(mod):
    wq = mod.w_quantizer
    if not (_active(wq) and isinstance(wq, UniformQuantizer)):
        return None
    if wq.ch_axis is not None and wq.scale.dim() == 1 and wq.scale.numel() > 1:
        if wq.ch_axis % mod.weight.dim() != 0 or wq.scale.numel() != mod.weight.shape[0]:
            return None
        return _UniformSpace(wq, 2, 0, 1, per_channel=True)
    return _UniformSpace(wq, 2)


def _search_linear(mod, X, G, in_ndim, metric, in_q, search_in, method, cfg):
    """Alternating weight / input search of one Linear / Conv. Returns a report dict."""
    w_space = _weight_space(mod)
    in_space, in_apply = None, None
    if _active(in_q):
        layout = _row_layout(in_q, mod, in_ndim)
        if layout is None:
            return dict(skipped='its input quantizer\'s channel axis is not the feature axis')
        searchable = search_in and _searchable_type(in_q)
        if searchable or isinstance(in_q, UniformQuantizer):
            sp = _make_space(in_q, 2, layout[0], layout[1], per_channel=False)
            in_apply = sp.apply_current
            if searchable:
                in_space = sp
                if isinstance(sp, _AdaLogSpace) and sp.two_d:
                    sp.top = max(float(X.max()) + in_q.shift, MIN_SCALE)
        else:
            def in_apply(x):
                return in_q.fake_quant(x).float()
    prob = _LinearProblem(mod, X, G, in_apply, in_space, w_space, cfg['chunk_elems'])
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
    rep = dict(before=before, after=prob.score(), rows=prob.R, rounds=rounds,
               searched=[n for n, s in (('weight', w_space), ('input', in_space)) if s is not None])
    if G is not None:
        rep['grad_rms'] = float(G.pow(2).mean().sqrt())
    return rep


# =================================================================================================
# Attention
# =================================================================================================
def _att_logits(aq, q, k, scale, bias, mask, mask_fn, quant: bool):
    """q̂k̂ᵀ·scale + bias + mask as in ``AttentionQuantizers.attend`` (q or k may carry a leading
    candidate dim); with ``quant`` the bias / mask quantizers are applied."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + (aq.rel_pos_bias(bias) if quant and _active(aq.rel_pos_bias) else bias)
    if mask is not None:
        if quant and _active(aq.mask):
            mask = aq.mask(mask)
        if mask_fn is not None:
            shape = logits.shape
            logits = mask_fn(logits.reshape(-1, *shape[-3:]), mask).reshape(shape)
        else:
            logits = logits + mask
    return logits


class _AttnProblem:
    def __init__(self, aq: AttentionQuantizers, records, budget):
        self.aq, self.records, self.budget = aq, records, budget
        self.heads = records[0]['q'].shape[1]
        for r in records:
            logits = _att_logits(aq, r['q'], r['k'], r['scale'], r['bias'], r['mask'],
                                 r['mask_fn'], False)
            r['P'] = logits.softmax(dim=-1)
            r['O'] = r['P'] @ r['v']
        self.n_logits = float(sum(r['q'].shape[0] * r['q'].shape[1] * r['q'].shape[2]
                                  * r['k'].shape[2] for r in records))
        self.n_out = float(sum(r['O'].numel() for r in records))

    @staticmethod
    def _cur(q, x):
        return q(x) if _active(q) else x

    def probs_from_logits(self, r, qh, kh, apply_probs=True):
        aq = self.aq
        logits = _att_logits(aq, qh, kh, r['scale'], r['bias'], r['mask'], r['mask_fn'], True)
        if aq.fused_softmax:
            return aq.probs(logits) if _active(aq.probs) else logits.softmax(dim=-1)
        if _active(aq.logits):
            logits = aq.logits(logits)
        s = logits.softmax(dim=-1)
        return self._cur(aq.probs, s) if apply_probs else s

    def score(self) -> float:
        aq, err = self.aq, 0.0
        for r in self.records:
            qh, kh, vh = self._cur(aq.q, r['q']), self._cur(aq.k, r['k']), self._cur(aq.v, r['v'])
            Oh = self.probs_from_logits(r, qh, kh) @ vh
            err += float(((Oh - r['O']) ** 2).sum())
        return -err / self.n_out

    def output_operand_scorer(self, role: str, space):
        """q (role 'q') or k ('k') scored on the attention output P̂·v̂ − P·v, per head."""
        aq = self.aq
        pre = []
        for r in self.records:
            cur = {key: self._cur(getattr(aq, key), r[key]) for key in ('q', 'k', 'v')}
            pre.append((r, cur))
        norm = self.n_out

        def scorer(p):
            n = p[0].shape[0]
            total = torch.zeros(n, self.heads, dtype=torch.float64)
            for r, cur in pre:
                a = r[role]
                per = 4 * r['P'].numel() + a.numel()
                parts = []
                for sl in _chunks(n, per, self.budget):
                    cand = space.fq(a, _take(p, sl))            # (m, B, H, N, d)
                    qh, kh = (cand, cur['k']) if role == 'q' else (cur['q'], cand)
                    E = self.probs_from_logits(r, qh, kh) @ cur['v'] - r['O']
                    parts.append((E * E).sum((1, 3, 4)).double())
                total += torch.cat(parts).cpu()
            return -total / norm
        return scorer

    def operand_scorer(self, role: str, space):
        """q (role 'q') or k ('k') on the logits error scale·(âb̂ᵀ − abᵀ), per head."""
        aq = self.aq
        other = 'k' if role == 'q' else 'q'
        pre = []
        for r in self.records:
            a, b = r[role], r[other]
            bh = self._cur(getattr(aq, other), b)
            db = bh - b
            Gb = bh.transpose(-2, -1) @ bh                          # (B, H, d, d)
            T = a @ (db.transpose(-2, -1) @ bh)                     # (B, H, Na, d)
            c = ((a @ (db.transpose(-2, -1) @ db)) * a).sum((0, 2, 3))   # (H,)
            s2 = float(r['scale']) ** 2
            pre.append((a, Gb, T, c, s2))
        norm = self.n_logits

        def scorer(p):
            n = p[0].shape[0]
            total = torch.zeros(n, self.heads, dtype=torch.float64)
            for a, Gb, T, c, s2 in pre:
                parts = []
                for sl in _chunks(n, 3 * a.numel(), self.budget):
                    D = space.fq(a, _take(p, sl)).sub_(a)           # (m, B, H, Na, d)
                    # Σ_i d_i·(b̂ᵀb̂)·d_iᵀ + 2 d_i·(F b̂)_i + ‖F‖² per head
                    e = torch.linalg.vecdot(torch.matmul(D, Gb).add_(T, alpha=2), D)
                    parts.append((e.sum((1, 3)) + c).double() * s2)
                total += torch.cat(parts).cpu()
            return -total / norm
        return scorer

    def probs_scorer(self, space):
        aq = self.aq
        pre = []
        for r in self.records:
            qh, kh, vh = self._cur(aq.q, r['q']), self._cur(aq.k, r['k']), self._cur(aq.v, r['v'])
            S = self.probs_from_logits(r, qh, kh, apply_probs=False)
            F2 = r['P'] @ (vh - r['v'])                              # (B, H, Nq, d)
            pre.append((S, vh, F2, r['P']))
        norm = self.n_out

        def scorer(p):
            n = p[0].shape[0]
            total = torch.zeros(n, self.heads, dtype=torch.float64)
            for S, vh, F2, P in pre:
                parts = []
                for sl in _chunks(n, 3 * S.numel(), self.budget):
                    E = (space.fq(S, _take(p, sl)) - P) @ vh + F2   # (m, B, H, Nq, d)
                    parts.append((E * E).sum((1, 3, 4)).double())
                total += torch.cat(parts).cpu()
            return -total / norm
        return scorer

    def v_scorer(self, space):
        aq = self.aq
        pre = []
        for r in self.records:
            qh, kh = self._cur(aq.q, r['q']), self._cur(aq.k, r['k'])
            Ph = self.probs_from_logits(r, qh, kh)
            F3 = (Ph - r['P']) @ r['v']
            pre.append((Ph, F3, r['v']))
        norm = self.n_out

        def scorer(p):
            n = p[0].shape[0]
            total = torch.zeros(n, self.heads, dtype=torch.float64)
            for Ph, F3, v in pre:
                parts = []
                for sl in _chunks(n, 2 * v.numel() + F3.numel(), self.budget):
                    E = Ph @ (space.fq(v, _take(p, sl)) - v) + F3   # (m, B, H, Nq, d)
                    parts.append((E * E).sum((1, 3, 4)).double())
                total += torch.cat(parts).cpu()
            return -total / norm
        return scorer


def _attn_space(q, heads):
    if not (_active(q) and _searchable_type(q)):
        return None
    if isinstance(q, UniformQuantizer):
        axis = None if q.ch_axis is None or q.scale.dim() == 0 else q.ch_axis % 4
        per_head = axis == 1 and q.scale.numel() == heads
        return _UniformSpace(q, 4, axis, 1, per_channel=per_head)
    if getattr(q, 'ch_axis', None) is not None:
        return None
    return _make_space(q, 4)


def _screen_records(records, frac: float):
    """The first ``frac`` of every record's batch rows (whole window groups with a window mask), or
    None when nothing gets smaller."""
    out, smaller = [], False
    for r in records:
        B = r['q'].shape[0]
        rows = max(1, math.ceil(B * frac))
        if r['mask'] is not None and r['mask_fn'] is not None and r['mask'].dim() >= 1:
            nw = r['mask'].shape[0]
            rows = min(B, -(-rows // nw) * nw)
        smaller |= rows < B
        sub = {key: r[key] for key in ('scale', 'bias', 'mask', 'mask_fn')}
        sub.update(q=r['q'][:rows], k=r['k'][:rows], v=r['v'][:rows])
        for key in ('bias', 'mask'):
            t = sub[key]
            if t is not None and r['mask_fn'] is None and t.dim() == 4 and t.shape[0] == B:
                sub[key] = t[:rows]
        out.append(sub)
    return out if smaller else None


def _search_attention(aq, records, method, cfg):
    prob = _AttnProblem(aq, records, cfg['chunk_elems'])
    srecs = _screen_records(records, ATTN_SCREEN_FRAC)
    sprob = None if srecs is None else _AttnProblem(aq, srecs, cfg['chunk_elems'])
    H = prob.heads
    spaces = dict(q=_attn_space(aq.q, H), k=_attn_space(aq.k, H),
                  probs=None if aq.fused_softmax else _attn_space(aq.probs, H),
                  v=_attn_space(aq.v, H))
    if spaces['probs'] is not None and isinstance(spaces['probs'], _AdaLogSpace) \
            and spaces['probs'].two_d:
        spaces['probs'].top = max(1.0 + aq.probs.shift, MIN_SCALE)

    def step(pr, role, sp, screening=False):
        if pr is None:
            return None
        if role in ('q', 'k'):
            if screening and cfg['attn_qk'] == 'logits':
                return _Step(pr.operand_scorer(role, sp))        # logits error
            return _Step(pr.output_operand_scorer(role, sp))
        if role == 'probs':
            return _Step(pr.probs_scorer(sp))
        return _Step(pr.v_scorer(sp))

    before = prob.score()
    rounds = 0
    for _ in range(cfg['rounds']):
        rounds += 1
        changed = False
        for role in ('q', 'k', 'probs', 'v'):
            sp = spaces[role]
            if sp is not None:
                changed |= search_quantizer(sp, step(prob, role, sp), method, cfg,
                                            step(sprob or prob, role, sp, screening=True))
        if not changed:
            break
    aq.refresh()
    return dict(before=before, after=prob.score(), rounds=rounds,
                images_rows=sum(r['q'].shape[0] for r in records),
                searched=[k for k, s in spaces.items() if s is not None])


# =================================================================================================
# Driver
# =================================================================================================
def _feeders(model) -> Dict[str, tuple]:
    """Linear path → (LayerNorm output quantizer, searched-here) for Linears without an input
    quantizer of their own (qkv / fc1 / patch-merging reduction: the norm's output quantizer
    quantizes their input). A norm feeding several Linears is searched with the first."""
    out = {}
    for norm_path, lin_paths in getattr(model, 'fqvit_reparam_pairs', []) or []:
        try:
            norm = model.get_submodule(norm_path)
        except AttributeError:
            continue
        oq = getattr(norm, 'out_quantizer', None)
        if oq is None or getattr(norm, 'integer', False):
            continue
        for i, p in enumerate(lin_paths):
            out[p] = (oq, i == 0)
    return out


def _targets(model):
    feeders = _feeders(model)
    lins, attns = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            if isinstance(mod, QuantConv2d) and mod.groups != 1:
                logger.info('layer search: %s is a grouped convolution; not searched', name)
                continue
            in_q, own = mod.in_quantizer, True
            if in_q is None and name in feeders:
                in_q, own = feeders[name]
            w_ok = _weight_space(mod) is not None
            i_ok = own and _active(in_q) and _searchable_type(in_q)
            if w_ok or i_ok:
                lins.append((name, mod, in_q, bool(i_ok)))
        elif isinstance(mod, AttentionQuantizers):
            roles = [mod.q, mod.k, mod.v] + ([] if mod.fused_softmax else [mod.probs])
            if any(_active(q) and _searchable_type(q) for q in roles):
                attns.append((name, mod))
    return lins, attns


def run_layer_search(model: nn.Module, spec, batches, forward_fn: Callable = None,
                     progress: bool = True) -> dict:
    """Search the quantizer parameters of every Linear / Conv / attention of a calibrated model.

    Args:
        model: converted and calibrated model (quantizers in 'quant' mode).
        spec: its ``QuantSpec``; ``spec.search`` is 'hessian' (PTQ4ViT) or 'fpcs' (AdaLog),
            ``spec.search_cfg`` overrides ``DEFAULTS``.
        batches: the calibration batches (re-iterated; the first ``images`` images are used).
        forward_fn: ``forward_fn(model, batch) -> output`` (default ``model(batch)``).
        progress: one log line per module.

    Returns a report: ``dict(metric=..., images=..., capture_s=..., modules={name: dict(before,
    after, ...)})`` with each module's score (higher is better) before and after its search.
    """
    cfg = search_config(spec)
    if spec.search not in ('hessian', 'fpcs'):
        raise ValueError(f'run_layer_search: spec.search must be "hessian" or "fpcs", got '
                         f'{spec.search!r}')
    forward_fn = forward_fn or (lambda m, b: m(b))
    method = 'grid' if spec.search == 'hessian' else 'fpcs'
    lins, attns = _targets(model)
    report = dict(metric=None, images=0, capture_s=0.0, modules={})
    if not lins and not attns:
        logger.info('layer search: nothing to search')
        return report
    if cfg['attn_images'] == 0:
        attns = []
    t0 = time.time()
    rows, records, metric, seen = _capture(model, [m for _, m, _, _ in lins],
                                           [a for _, a in attns], batches, forward_fn, cfg,
                                           spec.search == 'hessian')
    report.update(metric=metric, images=seen, capture_s=time.time() - t0)
    if progress:
        logger.info('layer search (%s, metric %s): %d Linear/Conv + %d attention modules, '
                    '%d images captured in %.1fs', spec.search, metric, len(lins), len(attns),
                    seen, report['capture_s'])
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    jobs = [(order[id(m)], 'lin', (n, m, q, s)) for n, m, q, s in lins] + \
           [(order[id(a)], 'attn', (n, a)) for n, a in attns]
    jobs.sort(key=lambda j: j[0])
    total = len(jobs)
    for i, (_, kind, job) in enumerate(jobs, 1):
        t1 = time.time()
        if kind == 'lin':
            name, mod, in_q, search_in = job
            X, G, in_ndim = rows.pop(mod)
            if X is None:
                rep = dict(skipped='module never ran on the calibration data')
            else:
                rep = _search_linear(mod, X, G, in_ndim, metric, in_q, search_in, method, cfg)
        else:
            name, aq = job
            recs = records.pop(aq)
            rep = (_search_attention(aq, recs, method, cfg) if recs
                   else dict(skipped='attention never ran on the calibration data'))
        rep['seconds'] = time.time() - t1
        report['modules'][name] = rep
        if progress:
            if 'skipped' in rep:
                logger.info('layer search [%d/%d] %s: skipped (%s)', i, total, name, rep['skipped'])
            else:
                logger.info('layer search [%d/%d] %s (%s): score %.4g -> %.4g, %d round(s), %.1fs',
                            i, total, name, '+'.join(rep['searched']), rep['before'],
                            rep['after'], rep['rounds'], rep['seconds'])
    report['total_s'] = time.time() - t0
    return report
