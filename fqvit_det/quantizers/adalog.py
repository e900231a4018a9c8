"""AdaLog (adaptive-base logarithmic) quantizer for post-softmax and post-GELU activations.

Base 2^(q/r) with r fixed (37) and an integer q:

    code      x_q = clamp(⌊−log2(x_s/Δ)·r/q⌉, 0, 2^b − 1),   x_s = x + η
    dequant   x̂_s = Δ·2^(−⌊x_q·q/r⌋)·T̂[(x_q·q) mod r]
    T̂[j]      = 2^(−j/r) rounded to the grid 1/(2^(b+1) − 2)   (hardware: a right shift + a LUT)

Entries whose code would be ≥ 2^b (including x_s = 0 exactly, negative x_s and NaN) get
``ZERO_CODE`` (−1, see ``log.py``) and dequantize to exactly 0. (The official code maps an input of
exactly 0 to 2^−50 at 6 bits; we fix that.) q = r reproduces the log2 quantizer; q ≈ r/2 is log√2.

Post-GELU mode: ``shift = η = 0.16997124`` (≈ −min GELU) is added before quantization so all
inputs are ≥ 0, and ``dequantize`` / ``fake_quant`` return x̂_s − η by default
(``subtract_shift=True``), so ``fake_quant(x) == dequantize(quantize(x))`` ≈ x. A deployment that
feeds x̂_s itself to the next Linear folds −η into its bias, W·(x̂_s − η) + b = W·x̂_s + (b − η·W·1);
``dequantize_shifted`` gives x̂_s.
"""
from typing import Optional, Sequence

import torch

from .base import (MIN_SCALE, Quantizer, check_bool, check_float, check_int, flat_chunks,
                   needs_autograd, scratch, single_threaded)
from .log import _as_float, finish_log_codes, pooled_samples, subsample  # noqa: F401
from .registry import register_quantizer
from .stats import BatchPool, PooledStatsMixin

GELU_SHIFT = 0.16997124
ADALOG_R = 37
ADALOG_Q_MIN, ADALOG_Q_MAX = 10, 137
# Δ factors (× the observed maximum of x + η) tried with every q when Δ is searched at finalize.
DEFAULT_SCALE_FACTORS = tuple(round(0.25 + 0.05 * i, 2) for i in range(20))  # 0.25 … 1.20


def adalog_base_candidates(device=None) -> torch.Tensor:
    """The documented AdaLog grid q ∈ {10, …, 137}: 128 values, both ends included (the official
    code's grid drops its last candidate; we keep the documented grid)."""
    return torch.arange(ADALOG_Q_MIN, ADALOG_Q_MAX + 1, dtype=torch.int64, device=device)


def adalog_lut(r: int = ADALOG_R, bits: int = 4, device=None) -> torch.Tensor:
    """T̂[j] = ⌊2^(−j/r)·G⌉ / G with G = 2^(b+1) − 2, j = 0 … r − 1 (float32)."""
    grid = 2 ** (bits + 1) - 2
    j = torch.arange(r, dtype=torch.float64, device=device)
    return (torch.round(torch.exp2(-j / r) * grid) / grid).to(torch.float32)


def _int_q(q) -> torch.Tensor:
    q = torch.as_tensor(q)
    if q.is_floating_point():
        if not torch.equal(q, torch.round(q)):
            raise ValueError('AdaLog: q must be integer-valued (the LUT is indexed by x_q·q mod r), '
                             f'got {q}')
    q = q.to(torch.int64)
    if bool((q <= 0).any()):
        raise ValueError(f'AdaLog: q must be positive, got {q}')
    return q


def adalog_quantize(x: torch.Tensor, delta, q, bits: int, r: int = ADALOG_R,
                    shift: float = 0.0) -> torch.Tensor:
    """x_q = clamp(⌊−log2((x + η)/Δ)·r/q⌉, 0, 2^b − 1) with ``ZERO_CODE`` for codes ≥ 2^b.

    ``delta`` and ``q`` may be tensors broadcasting against ``x`` (e.g. shape [n, 1, …] to score n
    candidates at once)."""
    xs = _as_float(x) + shift if shift else _as_float(x)
    delta = torch.as_tensor(delta, dtype=xs.dtype, device=xs.device)
    qf = _int_q(q).to(device=xs.device, dtype=xs.dtype)
    return finish_log_codes(torch.round(-torch.log2(xs / delta) * r / qf), bits)


def adalog_dequantize(codes: torch.Tensor, delta, q, r: int = ADALOG_R, lut=None, bits: int = 4,
                      shift: float = 0.0, subtract_shift: bool = True) -> torch.Tensor:
    """Δ·2^(−⌊x_q·q/r⌋)·T̂[(x_q·q) mod r] (0 for ``ZERO_CODE``), minus η if ``subtract_shift``."""
    if lut is None:
        lut = adalog_lut(r, bits, device=codes.device)
    qi = _int_q(q).to(codes.device)
    valid = codes >= 0
    e = codes.clamp(min=0).to(torch.int64) * qi
    hi = torch.div(e, r, rounding_mode='floor')
    lo = e - hi * r
    val = torch.as_tensor(delta, dtype=torch.float32, device=codes.device) * \
        torch.exp2(-hi.to(torch.float32)) * lut.to(codes.device)[lo]
    val = torch.where(valid, val, torch.zeros_like(val))
    return val - shift if (shift and subtract_shift) else val


def adalog_dequantize_exact(codes: torch.Tensor, delta, q, r: int = ADALOG_R, shift: float = 0.0,
                            subtract_shift: bool = True) -> torch.Tensor:
    """Float reference without the LUT: Δ·2^(−x_q·q/r) (0 for ``ZERO_CODE``)."""
    qf = _int_q(q).to(device=codes.device, dtype=torch.float32)
    valid = codes >= 0
    val = torch.as_tensor(delta, dtype=torch.float32, device=codes.device) * \
        torch.exp2(-codes.clamp(min=0).to(torch.float32) * qf / r)
    val = torch.where(valid, val, torch.zeros_like(val))
    return val - shift if (shift and subtract_shift) else val


def adalog_fake_quant(x: torch.Tensor, delta, q, bits: int, r: int = ADALOG_R, shift: float = 0.0,
                      subtract_shift: bool = True,
                      lut: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize–dequantize (LUT dequant). ``delta`` / ``q`` broadcast against ``x``, so a search can
    score many (Δ, q) candidates in one call."""
    codes = adalog_quantize(x, delta, q, bits, r, shift)
    return adalog_dequantize(codes, delta, q, r, lut, bits, shift, subtract_shift)


@torch.no_grad()
@single_threaded
def adalog_fake_quant_chunked(x: torch.Tensor, delta: torch.Tensor, q, bits: int, r: int = ADALOG_R,
                              shift: float = 0.0, subtract_shift: bool = True,
                              lut: Optional[torch.Tensor] = None):
    """``adalog_fake_quant`` for one (Δ, q) and float32 x, bit for bit, in cache-sized chunks.

    The code runs the reference's float32 ops in the same order ((x + η)/Δ, log2, −, ·r, /q,
    round); then a code is mapped through the table of the 2^b dequantized values (plus 0 for the
    zero code), which ``adalog_dequantize`` computes on the code range itself. ``None`` where that
    does not apply (the caller then uses the reference)."""
    if (not isinstance(delta, torch.Tensor) or delta.numel() != 1 or x.dim() == 0
            or x.numel() == 0 or x.dtype != torch.float32 or delta.dtype != torch.float32
            or not x.is_contiguous() or torch.as_tensor(q).numel() != 1):
        return None
    n = 2 ** bits
    d = delta.reshape(())
    qf = _int_q(q).to(device=x.device, dtype=torch.float32).reshape(())
    codes = torch.arange(n + 1, dtype=torch.int32, device=x.device)
    codes[-1] = -1                                     # the zero code (see finish_log_codes)
    table = adalog_dequantize(codes, d, q, r, lut, bits, shift, subtract_shift).float()
    out = torch.empty_like(x)
    for xc, o in flat_chunks(x, out):
        c = scratch('adalog_code', xc.shape, torch.float32, x.device)
        idx = scratch('adalog_index', xc.shape, torch.int64, x.device)
        if shift:
            torch.add(xc, shift, out=c)
            c.div_(d)
        else:
            torch.div(xc, d, out=c)
        c.log2_().neg_().mul_(r).div_(qf).round_()
        # NaN / +inf / ≥ 2^b are zero codes (index n); below 0 clamps to code 0
        torch.nan_to_num_(c, nan=float(n), posinf=float(n), neginf=0.0)
        c.clamp_(0, n)
        idx.copy_(c)
        torch.index_select(table, 0, idx, out=o)
    return out


def adalog_search(samples: torch.Tensor, deltas: torch.Tensor, qs: torch.Tensor, bits: int,
                  r: int = ADALOG_R, lut: Optional[torch.Tensor] = None, budget: int = 2 ** 22):
    """MSE of each (Δ_k, q_k) candidate on ``samples`` (already shifted, flat); errors [K]."""
    if lut is None:
        lut = adalog_lut(r, bits, device=samples.device)
    flat = samples.reshape(1, -1).float()
    chunk = max(1, budget // max(flat.shape[1], 1))
    errs = []
    for i in range(0, deltas.numel(), chunk):
        d = deltas[i:i + chunk].reshape(-1, 1).float()
        qq = qs[i:i + chunk].reshape(-1, 1)
        fq = adalog_fake_quant(flat, d, qq, bits, r, 0.0, False, lut)
        errs.append(((fq - flat) ** 2).mean(dim=1))
    return torch.cat(errs)


@register_quantizer()
class AdaLogQuantizer(PooledStatsMixin, Quantizer):
    """AdaLog quantizer (buffers: ``delta``, ``q`` (int64), ``lut``).

    Args:
        bits: code bit-width.
        r: fixed base denominator (37).
        q_init: initial q (37 = log2).
        shift: η added before quantization (0 post-softmax, ``GELU_SHIFT`` post-GELU).
        search_scale: also search Δ at ``finalize``. Δ is searched whenever ``shift != 0`` as well
            (post-GELU); otherwise Δ keeps its value (1 for softmax) and only q is searched.
        subtract_shift: ``dequantize`` returns x̂_s − η (True) or x̂_s (False: the next Linear's
            bias must absorb −η·W·1).
        q_candidates: q grid for ``finalize`` (default 10 … 137).
        scale_factors: Δ grid for ``finalize`` as multiples of max(x + η).
        max_samples: bound on the pooled calibration samples used by ``finalize``.

    The layer-output-driven search (FPCS) lives elsewhere; it uses ``set_params`` and
    ``adalog_fake_quant`` with candidate tensors.
    """

    PARAMS = ('delta', 'q')

    def __init__(self, bits: int = 4, r: int = ADALOG_R, q_init: int = ADALOG_R, shift: float = 0.0,
                 search_scale: bool = False, subtract_shift: bool = True,
                 q_candidates: Optional[Sequence[int]] = None,
                 scale_factors: Sequence[float] = DEFAULT_SCALE_FACTORS,
                 max_samples: int = 2 ** 16):
        super().__init__(bits)
        self.r = check_int(self, 'r', r, 1)
        self.shift = check_float(self, 'shift', shift, 0.0)
        self.search_scale = check_bool(self, 'search_scale', search_scale)
        self.subtract_shift = check_bool(self, 'subtract_shift', subtract_shift)
        if q_candidates is not None:
            if isinstance(q_candidates, (str, bytes)) or not isinstance(q_candidates, Sequence) \
                    or not q_candidates:
                raise TypeError(f'{type(self).__name__}: q_candidates must be None or a non-empty '
                                f'sequence of positive ints, got {q_candidates!r}')
            q_candidates = tuple(check_int(self, 'q_candidates', v, 1) for v in q_candidates)
        self.q_candidates = q_candidates
        if isinstance(scale_factors, (str, bytes)) or not isinstance(scale_factors, Sequence) \
                or not scale_factors:
            raise TypeError(f'{type(self).__name__}: scale_factors must be a non-empty sequence '
                            f'of positive numbers, got {scale_factors!r}')
        self.scale_factors = tuple(check_float(self, 'scale_factors', f, 0.0, None, lo_open=True)
                                   for f in scale_factors)
        self.max_samples = check_int(self, 'max_samples', max_samples, 1)
        check_int(self, 'q_init', q_init, 1)
        self.register_buffer('delta', torch.tensor(1.0))
        self.register_buffer('q', _int_q(q_init).reshape(()).clone())
        self.register_buffer('lut', adalog_lut(r, bits))
        self._pool = BatchPool(self.max_samples)

    @property
    def searches_delta(self) -> bool:
        return bool(self.search_scale or self.shift != 0.0)

    # --- calibration ------------------------------------------------------------------------
    def observe(self, x):
        xs = _as_float(x.detach())
        self._pool.append(subsample(xs + self.shift if self.shift else xs, self.max_samples))

    def finalize(self):
        if self._pool.num_batches == 0:
            raise RuntimeError(f'{self.qname}: no calibration data was observed')
        if not self._pool.items:
            raise RuntimeError(f'{self.qname}: the pooled samples were already released by '
                               'finalize(); observe again')
        xs = pooled_samples(self._pool.items, self.max_samples)
        dev = xs.device
        qs = (adalog_base_candidates(dev) if self.q_candidates is None
              else torch.tensor(self.q_candidates, dtype=torch.int64, device=dev))
        if self.searches_delta:
            top = max(float(xs.max()), MIN_SCALE)
            deltas = torch.tensor([top * f for f in self.scale_factors], device=dev)
            deltas = deltas.clamp(min=MIN_SCALE)
        else:
            deltas = self.delta.to(dev).reshape(1)
        dd = deltas.repeat_interleave(qs.numel())   # Δ-major order: ties keep the smaller Δ, then q
        qq = qs.repeat(deltas.numel())
        err = adalog_search(xs, dd, qq, self.bits, self.r, self.lut.to(dev))
        best = int(torch.argmin(err))
        self.set_params(delta=dd[best], q=qq[best])
        self._pool.items = []

    def set_params(self, delta=None, q=None):
        """Set Δ (scalar, clamped to ``MIN_SCALE``) and / or q (a positive integer)."""
        if delta is not None:
            delta = torch.as_tensor(delta, dtype=torch.float32).detach().reshape(())
            delta = delta.clamp(min=MIN_SCALE)
        if q is not None:
            q = _int_q(q).reshape(())
        self._assign_params({'delta': delta, 'q': q})

    # --- quantization -----------------------------------------------------------------------
    def quantize(self, x):
        return adalog_quantize(x, self.delta, self.q, self.bits, self.r, self.shift)

    def fake_quant(self, x):
        if not needs_autograd(x):
            out = adalog_fake_quant_chunked(x, self.delta, self.q, self.bits, self.r, self.shift,
                                            self.subtract_shift, self.lut)
            if out is not None:
                return out
        return super().fake_quant(x)

    def dequantize_shifted(self, codes):
        """x̂_s = x̂ + η (what hardware feeds to a bias-folded next Linear)."""
        return adalog_dequantize(codes, self.delta, self.q, self.r, self.lut, self.bits)

    def dequantize(self, codes):
        return adalog_dequantize(codes, self.delta, self.q, self.r, self.lut, self.bits, self.shift,
                                 self.subtract_shift)

    def dequantize_exact(self, codes):
        return adalog_dequantize_exact(codes, self.delta, self.q, self.r, self.shift,
                                       self.subtract_shift)

    def extra_repr(self):
        return (f'bits={self.bits}, r={self.r}, q={int(self.q)}, delta={float(self.delta):g}, '
                f'shift={self.shift:g}, mode={self.mode}')
