"""Candidate spaces: one quantizer's candidate parameters, evaluated with its own kernels.

A space holds candidates as a tuple of tensors with a leading candidate dimension (n, or (n, C)
for per-channel / per-head parameters), in the order of ``names`` (the quantizer's
``get_params()`` keys). ``fq(x, p)`` fake-quantizes ``x`` with every candidate through the
family's own no-grad kernel (``fake_quant_uniform`` with the candidates as channels,
``twin_*_fake_quant_fast`` / ``adalog_fake_quant_chunked`` once per candidate), so every candidate
rounds exactly as the quantizer's ``fake_quant`` at inference (bit-identical values, tested);
``apply(p)`` sets the first candidate with ``set_params``.

* ``UniformSpace``: candidate α maps to the range [α·min₀, α·max₀] of the range calibrated before
  the search (min/max recovered from scale and zero point) through the quantizer's own
  ``params_for_range`` (its range conventions: include_zero, clamp_zero_point);
  symmetric: Δ = α·Δ₀. Per-channel (weights, ``ch_axis=0``) and per-head (q / k / v) parameters
  get one α per channel when ``per_channel``.
* ``ExpSpace``: PTQ4ViT twin uniform: the split exponent (softmax, 0 … 19) or the post-GELU
  exponent m (−5 … 24).
* ``AdaLogSpace``: AdaLog (Δ, q); Δ stays fixed unless the quantizer searches it (post-GELU).
  Scored with ``subtract_shift=True`` (a folded fc2 bias makes both outputs equal).
* Log2, LogSqrt2, LogIntSoftmax, PTF: no space (not searched).
"""
from typing import Optional

import torch

from ..quantizers.adalog import AdaLogQuantizer, adalog_fake_quant, adalog_fake_quant_chunked
from ..quantizers.base import MIN_SCALE
from ..quantizers.twin import (TwinUniformGeluQuantizer, TwinUniformSoftmaxQuantizer,
                               twin_gelu_fake_quant_fast, twin_softmax_fake_quant_fast)
from ..quantizers.uniform import UniformQuantizer, fake_quant_uniform

SEARCHABLE = (UniformQuantizer, TwinUniformSoftmaxQuantizer, TwinUniformGeluQuantizer,
              AdaLogQuantizer)


def active(q) -> bool:
    """A calibrated quantizer in 'quant' mode."""
    return q is not None and q.mode == 'quant' and bool(q.calibrated)


def searchable(q) -> bool:
    return isinstance(q, SEARCHABLE)


def take(p, idx):
    return tuple(t[idx] for t in p)


def cat(*ps):
    return tuple(torch.cat(ts) for ts in zip(*ps))


def same(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


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


class Space:
    """Candidates of quantizer ``q`` applied to data with ``ndim`` dims (channels on ``axis``)."""
    names = ()
    per_channel = False
    channels = 1

    def __init__(self, q, ndim: int, axis: Optional[int] = None, repeat: int = 1):
        self.q, self.ndim, self.axis, self.repeat = q, ndim, axis, repeat

    def current(self):
        params = self.q.get_params()
        return tuple(params[k][None].clone() for k in self.names)

    def fq(self, x: torch.Tensor, p) -> torch.Tensor:
        """Fake-quantize ``x`` with every candidate in ``p``: (n, *x.shape)."""
        raise NotImplementedError

    def apply(self, p) -> None:
        self.q.set_params(**{k: t[0] for k, t in zip(self.names, p)})

    def apply_current(self, x):
        return self.fq(x, self.current())[0]


class UniformSpace(Space):
    """α ↦ range [α·min₀, α·max₀] of the pre-search calibrated range (symmetric: Δ = α·Δ₀)."""
    names = ('scale', 'zero_point')

    def __init__(self, q: UniformQuantizer, ndim, axis=None, repeat=1, per_channel=False):
        params = q.get_params()
        self.s0 = params['scale'].float()
        z0 = params['zero_point'].float()
        super().__init__(q, ndim, axis if self.s0.dim() == 1 else None, repeat)
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
            s, z = q.params_for_range(a * self.min0, a * self.max0)
        shape = (n, *self.s0.shape)
        return s.expand(shape).contiguous(), z.expand(shape).contiguous()

    def fq(self, x, p):
        """The quantizer's kernel ``fake_quant_uniform`` with the candidates as channels of one
        call (candidate × channel for per-channel parameters): one pass, no autograd."""
        s, z = (t.to(device=x.device, dtype=torch.float32) for t in p)
        x, n = x.float(), s.shape[0]
        if s.dim() == 1:
            xe = x.unsqueeze(0).expand(n, *x.shape)
            return fake_quant_uniform(xe, s, z, self.q.qmin, self.q.qmax, 0)
        if self.repeat == 1 and self.axis is not None:
            xt = x.movedim(self.axis, 0)
            xe = xt.unsqueeze(0).expand(n, *xt.shape).reshape(n * xt.shape[0], *xt.shape[1:])
            out = fake_quant_uniform(xe, s.reshape(-1), z.reshape(-1), self.q.qmin, self.q.qmax, 0)
            return out.reshape(n, *xt.shape).movedim(1, self.axis + 1)
        sv, zv = (_pview(t, self.ndim, self.axis, self.repeat) for t in (s, z))
        return fake_quant_uniform(x, sv, zv, self.q.qmin, self.q.qmax)


class ExpSpace(Space):
    """PTQ4ViT twin uniform: one integer exponent (softmax split i, or GELU m)."""

    def __init__(self, q, ndim):
        super().__init__(q, ndim)
        if isinstance(q, TwinUniformSoftmaxQuantizer):
            self.fast, self.names = twin_softmax_fake_quant_fast, ('split_exp',)
        else:
            self.fast, self.names = twin_gelu_fake_quant_fast, ('pos_exp',)

    def grid(self):
        return (torch.tensor(self.q.candidate_exps(), dtype=torch.int64),)

    def current(self):
        return (super().current()[0].reshape(1).to(torch.int64).cpu(),)

    def fq(self, x, p):
        """The quantizer's no-grad kernel, once per candidate exponent."""
        return torch.stack([self.fast(x, int(e), self.q.bits) for e in p[0].tolist()])


class AdaLogSpace(Space):
    """AdaLog: (Δ, q); Δ stays fixed unless the quantizer searches it (post-GELU)."""
    names = ('delta', 'q')

    def __init__(self, q: AdaLogQuantizer, ndim):
        super().__init__(q, ndim)
        self.two_d = q.searches_delta
        # Δ grid scale: callers set max(x + η) of the search data
        self.top = max(float(q.get_params()['delta']), MIN_SCALE)

    def current(self):
        delta, qq = super().current()
        return delta.float().reshape(1).cpu(), qq.reshape(1).to(torch.int64).cpu()

    def fq(self, x, p):
        """The quantizer's no-grad kernel, once per (Δ, q) candidate."""
        q, x = self.q, x.float().contiguous()
        delta = p[0].to(device=x.device, dtype=torch.float32)
        out = torch.empty((delta.shape[0], *x.shape), dtype=torch.float32, device=x.device)
        for i, qi in enumerate(p[1].tolist()):
            d = delta[i].reshape(())
            o = adalog_fake_quant_chunked(x, d, qi, q.bits, q.r, q.shift, True)
            out[i] = o if o is not None else adalog_fake_quant(x, d, qi, q.bits, q.r, q.shift, True)
        return out


def make_space(q, ndim, axis=None, repeat=1, per_channel=False):
    if isinstance(q, UniformQuantizer):
        return UniformSpace(q, ndim, axis, repeat, per_channel)
    if isinstance(q, (TwinUniformSoftmaxQuantizer, TwinUniformGeluQuantizer)):
        return ExpSpace(q, ndim)
    if isinstance(q, AdaLogQuantizer):
        return AdaLogSpace(q, ndim)
    return None


def weight_space(mod):
    """Space of a Linear / Conv weight quantizer (per output channel when the quantizer is), or
    None when it is not searched."""
    wq = mod.w_quantizer
    if not (active(wq) and isinstance(wq, UniformQuantizer)):
        return None
    scale = wq.get_params()["scale"]
    if wq.ch_axis is not None and scale.dim() == 1 and scale.numel() > 1:
        if wq.ch_axis % mod.weight.dim() != 0 or scale.numel() != mod.weight.shape[0]:
            return None
        return UniformSpace(wq, 2, 0, 1, per_channel=True)
    return UniformSpace(wq, 2)


def summarize_params(q) -> dict:
    """Report form of ``q.get_params()``: scalars as numbers, tensors as min / mean / max."""
    out = {}
    for k, t in q.get_params().items():
        t = t.detach().cpu()
        if t.numel() == 1:
            out[k] = t.item()
        else:
            f = t.double()
            out[k] = dict(min=float(f.min()), mean=float(f.mean()), max=float(f.max()),
                          numel=int(t.numel()))
    return out


def chunks(n: int, per_candidate: int, budget: int):
    """Slices of n candidates sized so each intermediate holds about ``budget`` elements."""
    step = max(1, budget // max(per_candidate, 1))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))
