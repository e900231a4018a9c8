"""Search of one attention (``AttentionQuantizers``) on its captured float operands.

The metric is always the attention-output MSE (a documented choice, also under metric
'hessian': no gradient of the attention output is captured; the report says 'mse' for these
modules). Every step is decided on the output error P̂·v̂ − P·v (per head for per-head
quantizers). q and k are *screened* on the logits error scale·(q̂k̂ᵀ − qkᵀ) (an unquantized bias /
mask is additive and cancels) and their ``confirm`` best candidates then compared with the current
scale on the output error: the logits MSE alone can raise the output error (it weighs all logits
alike, softmax does not; measured on DeiT-Tiny block 0: ×1.6). ``attn_qk='output'`` screens q, k
on the output error too. probs and v are searched on the output error. Rounds alternate
(q, k, probs, v). Candidates are screened on the first quarter of the captured images' rows.

Per-channel logits / probability quantizers are applied at their current parameters only on
unbatched layouts (the presets use per-tensor ones).
"""
import math

import torch

from ..quantizers.base import MIN_SCALE
from ..quantizers.uniform import UniformQuantizer
from .select import search_quantizer
from .spaces import (AdaLogSpace, UniformSpace, active, chunks, make_space, searchable,
                     summarize_params, take)

ATTN_SCREEN_FRAC = 0.25     # attention candidates are screened on this share of the captured rows


def _att_logits(aq, q, k, scale, bias, mask, mask_fn, quant: bool):
    """q̂k̂ᵀ·scale + bias + mask as in ``AttentionQuantizers.attend`` (q or k may carry a leading
    candidate dim); with ``quant`` the bias / mask quantizers are applied."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + (aq.rel_pos_bias(bias) if quant and active(aq.rel_pos_bias) else bias)
    if mask is not None:
        if quant and active(aq.mask):
            mask = aq.mask(mask)
        if mask_fn is not None:
            shape = logits.shape
            logits = mask_fn(logits.reshape(-1, *shape[-3:]), mask).reshape(shape)
        else:
            logits = logits + mask
    return logits


class AttnProblem:
    def __init__(self, aq, records, budget):
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
        return q(x) if active(q) else x

    def probs_from_logits(self, r, qh, kh, apply_probs=True):
        aq = self.aq
        logits = _att_logits(aq, qh, kh, r['scale'], r['bias'], r['mask'], r['mask_fn'], True)
        if aq.fused_softmax:
            return aq.probs(logits) if active(aq.probs) else logits.softmax(dim=-1)
        if active(aq.logits):
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
                for sl in chunks(n, per, self.budget):
                    cand = space.fq(a, take(p, sl))            # (m, B, H, N, d)
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
                for sl in chunks(n, 3 * a.numel(), self.budget):
                    D = space.fq(a, take(p, sl)).sub_(a)           # (m, B, H, Na, d)
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
                for sl in chunks(n, 3 * S.numel(), self.budget):
                    E = (space.fq(S, take(p, sl)) - P) @ vh + F2   # (m, B, H, Nq, d)
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
                for sl in chunks(n, 2 * v.numel() + F3.numel(), self.budget):
                    E = Ph @ (space.fq(v, take(p, sl)) - v) + F3   # (m, B, H, Nq, d)
                    parts.append((E * E).sum((1, 3, 4)).double())
                total += torch.cat(parts).cpu()
            return -total / norm
        return scorer


def _attn_space(q, heads):
    if not (active(q) and searchable(q)):
        return None
    if isinstance(q, UniformQuantizer):
        scale = q.get_params()['scale']
        axis = None if q.ch_axis is None or scale.dim() == 0 else q.ch_axis % 4
        per_head = axis == 1 and scale.numel() == heads
        return UniformSpace(q, 4, axis, 1, per_channel=per_head)
    if getattr(q, 'ch_axis', None) is not None:
        return None
    return make_space(q, 4)


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


def search_attention(aq, records, method, cfg):
    prob = AttnProblem(aq, records, cfg['chunk_elems'])
    srecs = _screen_records(records, ATTN_SCREEN_FRAC)
    sprob = None if srecs is None else AttnProblem(aq, srecs, cfg['chunk_elems'])
    H = prob.heads
    spaces = dict(q=_attn_space(aq.q, H), k=_attn_space(aq.k, H),
                  probs=None if aq.fused_softmax else _attn_space(aq.probs, H),
                  v=_attn_space(aq.v, H))
    if spaces['probs'] is not None and isinstance(spaces['probs'], AdaLogSpace) \
            and spaces['probs'].two_d:
        spaces['probs'].top = max(1.0 + aq.probs.shift, MIN_SCALE)

    def step(pr, role, sp, screening=False):
        if pr is None:
            return None
        if role in ('q', 'k'):
            if screening and cfg['attn_qk'] == 'logits':
                return pr.operand_scorer(role, sp)        # logits error
            return pr.output_operand_scorer(role, sp)
        if role == 'probs':
            return pr.probs_scorer(sp)
        return pr.v_scorer(sp)

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
    searched = {k: s for k, s in spaces.items() if s is not None}
    return dict(metric='mse', before=before, after=prob.score(), rounds=rounds,
                images_rows=sum(r['q'].shape[0] for r in records), searched=list(searched),
                params={k: summarize_params(s.q) for k, s in searched.items()})
