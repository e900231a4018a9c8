"""Capture of the search data from the float model (every quantizer switched to 'float').

* every searched ``QuantLinear`` / ``QuantConv2d``: a deterministic random subsample of its input
  rows (Conv: the input patches of sampled output positions), about ``max_rows / images`` rows per
  image and at most ``max_rows`` per module. Outputs are not stored: O = X·Wᵀ is recomputed.
* every searched attention (``AttentionQuantizers``): the unquantized q, k, v (+ bias, mask) of the
  first ``attn_images`` images, through the module's ``_recorder`` hook of ``attend``. Queries are
  subsampled to ``attn_rows`` when longer (not with window masks, whose shape fixes N).
* metric 'hessian': in the same passes g = ∂L/∂(layer output) on the float model
  (``output_gradients`` with ``pseudo_label_loss``, sub-batches of ``grad_batch`` images; the
  gradients are multiplied by the sub-batch size, i.e. taken of the per-image loss), kept for the
  sampled rows only.

Captured tensors stay on the model's device. Row / query subsampling draws indices from a CPU
generator seeded by (seed, module, call) and moves them to the data's device, so the same rows are
chosen on every device.
"""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..walk import named_quantizers, refresh, set_quant_mode
from .objectives import output_gradients, pseudo_label_loss

HESSIAN_FIX = ("set quant_cfg.search_cfg.metric='mse' to search on the layer-output MSE instead")


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


class RowCapture:
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


class AttnRecorder:
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


class _ForwardFn(nn.Module):
    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def _check_logits(outputs):
    """The Hessian-guided metric differentiates a classification loss of the model output."""
    if not torch.is_tensor(outputs) or outputs.dim() < 2 or not outputs.is_floating_point():
        what = (f'a tensor of shape {tuple(outputs.shape)}' if torch.is_tensor(outputs)
                else f'a {type(outputs).__name__}')
        raise ValueError("quant_cfg.search_cfg.metric='hessian' needs classification logits "
                         f'(a float tensor [images, classes]) from the model, but its output is '
                         f'{what} (a detector?); {HESSIAN_FIX}')


def capture(model, lin_mods, attn_mods, batches, forward_fn, cfg):
    """Float-model capture. Returns ({mod: (X, G, input ndim)}, {aq: [records]}, images)."""
    caps = {m: RowCapture(m, i, cfg['seed']) for i, m in enumerate(lin_mods)}
    recs = {a: AttnRecorder(cfg['attn_rows'], cfg['seed'], i) for i, a in enumerate(attn_mods)}
    images, attn_images = cfg['images'], cfg['attn_images']
    use_grad = cfg['metric'] == 'hessian' and bool(lin_mods)
    saved_modes = [(q, q.mode) for _, q in named_quantizers(model)]
    was_training = model.training
    handles = [m.register_forward_hook(c.hook) for m, c in caps.items()]
    for a, r in recs.items():
        a._recorder = r
    wrapper = _ForwardFn(model, forward_fn)
    params = [p for p in model.parameters() if p.is_floating_point()]
    saved_req = [p.requires_grad for p in params]

    out_count = {}

    def loss_fn(outputs, ref):
        _check_logits(outputs)
        out_count['n'] = _output_count(outputs)
        return pseudo_label_loss(outputs, ref)

    def run_piece(piece, count):
        for c in caps.values():
            c.quota = max(1, math.ceil(cfg['max_rows'] * (count or images) / images))
            c.want_grad = use_grad
            c.pending = []
        if not use_grad:
            with torch.no_grad():
                out = forward_fn(model, piece)
            return count if count is not None else _output_count(out)
        leaf = torch.is_tensor(piece) and piece.is_floating_point()
        for p in params:
            p.requires_grad_(not leaf)
        try:
            grads = output_gradients(wrapper, (piece,), list(caps), loss_fn=loss_fn)
        except RuntimeError as err:
            raise RuntimeError(f'layer search: the Hessian-guided metric needs output gradients, '
                               f'which failed ({err}); {HESSIAN_FIX}') from err
        finally:
            for p, r in zip(params, saved_req):
                p.requires_grad_(r)
        n = count if count is not None else out_count['n']
        for m, c in caps.items():
            c.add_grads(grads[m], float(n))
        return n

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
            q.set_mode(mode)
        refresh(model)
        model.train(was_training)
    rows = {m: c.result(cfg['max_rows'], use_grad) + (c.in_ndim,) for m, c in caps.items()}
    return rows, {a: r.records for a, r in recs.items()}, seen
