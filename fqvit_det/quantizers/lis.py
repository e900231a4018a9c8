"""FQ-ViT Log-Int-Softmax (LIS): 8-bit logits, I-BERT integer exp, integer ratio Σexp/exp_i and a
log2 code, replacing softmax + probability quantization."""
import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .base import Quantizer, check_finite, check_int, chunk_step, is_integral, scratch, single_threaded
from .log import CODE_DTYPE, ZERO_CODE, log2_dequantize
from .registry import register_quantizer
from .uniform import UniformQuantizer

# I-BERT i-exp constants (FQ-ViT LIS): exp(r) ≈ 0.35815147·r² + 0.96963238·r + 1 on r ∈ (−ln2, 0].
EXP_POLY = (0.35815147, 0.96963238, 1.0)
EXP_X0 = -0.6931          # −ln 2 as written in the published algorithm (4 digits)
EXP_N = 30                # exponent range: inputs are clamped at n·x0


def int_exp_constants(scale: float):
    """Integer constants of the i-exp for logit scale S.

    x0_int = ⌊x0/S⌋ with x0 = −0.6931. FQ-ViT (after I-BERT) *floors* this constant, so the
    effective ln2 step is |x0_int|·S ≥ 0.6931: after q steps the result is too large by
    e^{q·(|x0_int|·S − ln2)} < e^{q·S}, biasing small probabilities upward. This is part of the published integer algorithm
    and kept on purpose.
    The polynomial a·r² + b·r + c is renormalised by its leading coefficient, a·(r·(r + b/a) + c/a),
    and evaluated on the integer r_int (r = r_int·S) as z = r_int·(r_int + b_int) + c_int with
    b_int = ⌊(b/a)/S⌋, c_int = ⌊(c/a)/S²⌋; the output scale is a·S².
    """
    a, b, c = EXP_POLY
    x0_int = math.floor(EXP_X0 / scale)
    b_int = math.floor(b / a / scale)
    c_int = math.floor(c / a / scale ** 2)
    return x0_int, b_int, c_int, a * scale ** 2


def int_exp_parts(x_int: torch.Tensor, scale: float, n: int = EXP_N):
    """i-exp before the final shift: (z, q, poly_scale) with exp(x_int·S) ≈ z·poly_scale·2^−q.

    ``x_int`` must be ≤ 0 (max-subtracted). Inputs are clamped at n·x0_int, q = ⌊x/x0_int⌋
    (integer floor division) and r = x − q·x0_int ∈ (x0_int, 0].
    """
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f'int_exp: scale must be positive, got {scale}')
    x0_int, b_int, c_int, poly_scale = int_exp_constants(scale)
    if c_int >= 2 ** 62:
        raise OverflowError(f'int_exp: logit scale {scale:g} is too small for int64 arithmetic')
    x = x_int.to(torch.int64)
    if bool((x > 0).any()):
        raise ValueError('int_exp: integer logits must be ≤ 0 (subtract the row maximum first)')
    x = torch.clamp(x, min=n * x0_int)
    q = torch.div(x, x0_int, rounding_mode='floor')
    r = x - q * x0_int
    z = torch.clamp(r * (r + b_int) + c_int, min=0)
    return z, q, poly_scale


def int_exp(x_int: torch.Tensor, scale, n: int = EXP_N):
    """I-BERT / FQ-ViT integer exp of the real value x_int·scale (x_int ≤ 0).

    Returns ``(exp_int, exp_scale)`` (int64, float) with exp(x_int·scale) ≈ exp_int·exp_scale, where
    exp_int = z << (n − q) and exp_scale = a·S²/2^n (see ``int_exp_parts``). Raises OverflowError
    where z·2^n would not fit in int64 (logit scales below ≈ 1.8e-5 at n = 30); ``LogIntSoftmax``
    avoids that by shifting relative to the row's largest q instead of n.
    """
    scale = float(scale)
    z, q, poly_scale = int_exp_parts(x_int, scale, n)
    if (int(z.max()) if z.numel() else 0) >= 2 ** (63 - n):
        raise OverflowError(f'int_exp: z·2^{n} overflows int64 at logit scale {scale:g}')
    return torch.bitwise_left_shift(z, n - q), poly_scale / 2 ** n


def ilog2_floor(x: torch.Tensor) -> torch.Tensor:
    """⌊log2 x⌋ for int64 x ≥ 1, by a binary search on shifts (exact, no float conversion)."""
    f = torch.zeros_like(x)
    for s in (32, 16, 8, 4, 2, 1):
        f = f + s * (torch.bitwise_right_shift(x, f + s) > 0).to(x.dtype)
    return f


def log2_round_half_up(x: torch.Tensor) -> torch.Tensor:
    """round(log2 x) as ⌊log2 x⌋ + [x − 2^⌊log2 x⌋ ≥ 2^(⌊log2 x⌋−1)] for int64 x ≥ 1.

    The condition is bit ⌊log2 x⌋ − 1 of x, so this stays in integers.
    """
    f = ilog2_floor(x)
    half = torch.bitwise_and(torch.bitwise_right_shift(x, (f - 1).clamp(min=0)), 1)
    return f + torch.where(f >= 1, half, torch.zeros_like(half))


def int_ratio_round(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """⌊num/den⌉ for int64 num ≥ 0, den > 0, ties to even (FQ-ViT rounds the ratio with
    ``torch.round``)."""
    q = torch.div(num, den, rounding_mode='floor')
    twice_rem = 2 * (num - q * den)
    up = (twice_rem > den) | ((twice_rem == den) & (torch.remainder(q, 2) == 1))
    return q + up.to(q.dtype)


@register_quantizer()
class LogIntSoftmax(Quantizer):
    """FQ-ViT Log-Int-Softmax: integer softmax with b-bit log2 output codes.

    Replaces ``softmax(logits, −1)`` followed by the probability quantizer. The module owns the
    8-bit per-tensor uniform quantizer of the attention logits (``logit_quant``, asymmetric, MinMax
    observer by default; ``include_zero=False`` keeps the observed logit range as FQ-ViT does).
    In 'quant' mode:

    1. x_int = logit codes, minus the row maximum (the zero point cancels);
    2. i-exp (``int_exp_parts``): exp_j ∝ z_j·2^(n − q_j);
    3. R_i = ⌊Σ_j exp_j / exp_i⌉ (integer, ties to even as FQ-ViT's ``torch.round``);
    4. code_i = round-half-up(log2 R_i) in integers, clamp to [0, 2^b − 1]; codes ≥ 2^b (and
       exp_i = 0) → ``ZERO_CODE``; dequant 2^−code.

    Overflow guard: the ratio only needs the exps up to a common factor, so each row uses
    e_j = z_j·2^(q_ref − q_j) with q_ref the row's largest q, which equals the published
    z_j·2^(n − q_j) divided by 2^(n − q_ref) exactly. (With n = 30, the published values summed
    over a row of 3136 tokens already exceed int64 at a logit scale of ~1e-3.) If N·max e_j could
    still reach 2^61, all e_j are right-shifted by the few bits needed (floor; lossy only in that
    extreme case, e.g. 16-bit logits over a wide range).
    """

    replaces_softmax = True   # consumes the attention logits; the converter drops the logits role

    PARAMS = ('scale', 'zero_point')

    def __init__(self, bits: int = 4, logit_bits: int = 8, n: int = EXP_N, logit_observer=None,
                 include_zero: bool = True):
        super().__init__(bits)
        check_int(self, 'logit_bits', logit_bits, 2, 16)
        self.n = check_int(self, 'n', n, 1, 62)
        self.logit_quant = UniformQuantizer(bits=logit_bits, symmetric=False, ch_axis=None,
                                            observer=logit_observer, include_zero=include_zero)
        self.logit_quant.qname = f'{self.qname}.logit_quant (attention logits)'

    def forward(self, x):
        if self.mode == 'float':
            return F.softmax(x, dim=-1)
        if self.mode == 'observe':
            with torch.no_grad():
                check_finite(x, self.qname)
                self.observe(x.detach())
            return F.softmax(x, dim=-1)
        return self.fake_quant(x)

    def observe(self, x):
        # The logit quantizer is driven through this module (its own mode is not used).
        self.logit_quant.qname = f'{self.qname}.logit_quant (attention logits)'
        self.logit_quant.observe(x)

    def finalize(self):
        self.logit_quant.finalize()
        self.params_changed()
        self.mark_calibrated()

    # statistics and parameters are those of the logit quantizer
    @property
    def num_observed(self) -> int:
        return self.logit_quant.num_observed

    def reset_stats(self):
        self.logit_quant.reset_stats()

    def calibration_stats(self):
        return self.logit_quant.calibration_stats()

    def load_calibration_stats(self, stats):
        self.logit_quant.load_calibration_stats(stats)

    def merge_calibration_stats(self, per_rank):
        return self.logit_quant.merge_calibration_stats(per_rank)

    def get_params(self):
        """The logit quantizer's ``scale`` and ``zero_point``."""
        return self.logit_quant.get_params()

    def set_params(self, scale=None, zero_point=None):
        self.logit_quant.set_params(scale=scale, zero_point=zero_point)
        self.params_changed()
        self.mark_calibrated()

    def params_changed(self):
        self._fast_cache = None

    @property
    def logit_scale(self) -> float:
        if self.logit_quant.scale.numel() != 1:
            raise ValueError(f'{self.qname}: the logit quantizer must be per-tensor')
        return float(self.logit_quant.scale)

    def exp_ratios(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Integer row-relative exps e (int64) and R = ⌊Σe/e⌉ (int64, 0 where e = 0)."""
        x_int = self.logit_quant.quantize(logits).to(torch.int64)
        x_int = x_int - x_int.amax(dim=-1, keepdim=True)
        z, q, _ = int_exp_parts(x_int, self.logit_scale, self.n)
        q_ref = q.amax(dim=-1, keepdim=True)
        e = torch.bitwise_left_shift(z, q_ref - q)
        n_tok = e.shape[-1]
        e_max = int(e.max()) if e.numel() else 0
        k = 0
        while (e_max >> k) * n_tok >= 2 ** 61:
            k += 1
        if k:
            e = torch.bitwise_right_shift(e, k)
        total = e.sum(dim=-1, keepdim=True)
        pos = e > 0
        ratio = int_ratio_round(total, torch.where(pos, e, torch.ones_like(e)))
        return e, torch.where(pos, ratio, torch.zeros_like(ratio))

    def quantize_exact(self, logits):
        """Codes by the literal int64 algorithm (``exp_ratios`` + ``log2_round_half_up``): the
        specification that ``quantize`` / ``fake_quant`` reproduce bit for bit, faster."""
        e, ratio = self.exp_ratios(logits)
        pos = ratio > 0
        code = log2_round_half_up(torch.where(pos, ratio, torch.ones_like(ratio)))
        zero = (~pos) | (code >= 2 ** self.bits)
        return torch.where(zero, torch.full_like(code, ZERO_CODE), code).to(CODE_DTYPE)

    def quantize(self, logits):
        codes = self._fast(logits, want_codes=True)
        return codes if codes is not None else self.quantize_exact(logits)

    def dequantize(self, codes):
        return log2_dequantize(codes, 1.0)

    def fake_quant(self, x):
        out = self._fast(x, want_codes=False)
        if out is not None:
            return out
        return self.dequantize(self.quantize_exact(x)).to(x.dtype)

    # --- fast path ------------------------------------------------------------------------
    # With b_l-bit logits, a row-max-subtracted logit d = max − x_int takes only 2^b_l values, so
    # the i-exp is a table: T[d] = z(d)·2^(Q − q(d)) with Q the largest q in the table. A row's
    # exps of ``exp_ratios`` are e_j = T[d_j] / 2^(Q − q_ref) exactly (q_ref ≤ Q), and the ratio
    # R_i = ⌊Σe / e_i⌉ is unchanged by that common power of two, so R_i = ⌊Σ_j T_j / T_i⌉.
    # While (2·N + 1)·max T < 2^53 every sum is an exact float64 integer, no headroom shift k is
    # needed (max e·N < 2^61), and torch.round (ties to even) of the float64 quotient is the
    # exact rounding: the exact quotient is a multiple of 1/T, so unless it is itself a tie
    # (then the division is exact) it is ≥ 1/(2T) away from every tie k + 1/2, more than the
    # quotient's rounding error (Σ < 2^52). The half-up log2 code is code = ⌊log2(R / 1.5)⌋ + 1 (thresholds R ≥ 2, 3,
    # 6, 12, …), i.e. 2^−code = 1 / (largest power of two ≤ R / 0.75); R/0.75 is compared with
    # powers of two only at integer R, so its rounding cannot cross one. T = 0 gives R = inf →
    # 2^−code = 0, the zero code, as do codes ≥ 2^b.
    def _fast_tables(self, n_tok: int, device):
        lq = self.logit_quant
        if lq.scale.numel() != 1 or lq.zero_point.numel() != 1:
            return None
        scale = float(lq.scale)
        key = (scale, float(lq.zero_point), lq.qmin, lq.qmax, self.n, self.bits, n_tok, str(device))
        cache = getattr(self, '_fast_cache', None)
        if cache is not None and cache[0] == key:
            return cache[1]
        tables = None
        if scale > 0 and math.isfinite(scale) and is_integral(lq.zero_point):
            x0_int, b_int, c_int, _ = int_exp_constants(scale)
            if 0 < c_int < 2 ** 62:
                d = torch.arange(lq.qmax - lq.qmin + 1, dtype=torch.int64)
                z, q, _ = int_exp_parts(-d, scale, self.n)
                q_top = int(q.max())
                if int(z.max()) * 2 ** q_top * (2 * n_tok + 1) < 2 ** 53:
                    t = torch.bitwise_left_shift(z, q_top - q).to(torch.float64)
                    zp = float(lq.zero_point)
                    tables = dict(T=t.to(device), lo=lq.qmin - zp, hi=lq.qmax - zp,
                                  p_zero=2.0 ** -(2 ** self.bits) if self.bits < 10 else 0.0)
        self._fast_cache = (key, tables)
        return tables

    @torch.no_grad()   # integer codes: the exact path's output carries no gradient either
    @single_threaded
    def _fast(self, x: torch.Tensor, want_codes: bool):
        """Codes (int32) or dequantized values (x.dtype) equal to the exact path, or ``None``."""
        if (x.dim() == 0 or x.numel() == 0 or not x.is_floating_point()
                or x.dtype != self.logit_quant.scale.dtype):
            return None
        n_tok = x.shape[-1]
        tb = self._fast_tables(n_tok, x.device)
        if tb is None:
            return None
        s = self.logit_quant.scale.reshape(())
        x2 = x.reshape(-1, n_tok)
        dev = x.device
        out = torch.empty(x2.shape, dtype=torch.int32 if want_codes else torch.float32, device=dev)
        step = chunk_step(n_tok, device=dev)
        for i in range(0, x2.shape[0], step):
            xc = x2[i:i + step]
            # logit codes (zero point folded into the clamp bounds; it cancels in max − x)
            c = torch.div(xc, s, out=scratch('lis_c', xc.shape, xc.dtype, dev))
            c.round_().clamp_(tb['lo'], tb['hi'])
            mx = c.amax(dim=-1, keepdim=True)
            if not bool(torch.isfinite(mx).all()):
                return None                               # NaN logits: leave them to the exact path
            idx = scratch('lis_idx', xc.shape, torch.int32, dev)
            idx.copy_(torch.sub(mx, c, out=c))            # d = max − x_int ∈ [0, 2^b_l − 1]
            t = scratch('lis_t', xc.shape, torch.float64, dev)
            torch.index_select(tb['T'], 0, idx.view(-1), out=t.view(-1))
            tot = t.sum(dim=-1, keepdim=True)
            r = torch.div(tot, t, out=scratch('lis_r', xc.shape, torch.float64, dev))
            r.round_().div_(0.75)                         # R / 0.75, R = ⌊Σe/e⌉ (inf where T = 0)
            r.view(torch.int64).bitwise_and_(0x7FF0000000000000)   # 2^code
            o = out[i:i + step]
            if want_codes:
                code = torch.bitwise_right_shift(r.view(torch.int64), 52).sub_(1023)
                code.masked_fill_(code >= min(2 ** self.bits, 1024), ZERO_CODE)
                o.copy_(code)
            else:
                o.copy_(r.reciprocal_())
                torch.nn.functional.threshold_(o, tb['p_zero'], 0.0)
        if want_codes:
            return out.view(x.shape)
        return out.view(x.shape).to(x.dtype)

    def extra_repr(self):
        return f'bits={self.bits}, logit_bits={self.logit_quant.bits}, n={self.n}, mode={self.mode}'
