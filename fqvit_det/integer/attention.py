"""Integer attention core: QKᵀ as an int8 GEMM, requantization, P·V on log / twin codes.

Kernels (vectorized; the only Python loops are over the batch·head matrices of a GEMM and over
cache-sized chunks), with what is integer, what is not, and the bound:

* ``dyadic_multiplier`` / ``apply_dyadic`` / ``rounding_shift`` — a positive real multiplier m
  as M·2^−N with a ``bits``-bit integer M (|M·2^−N − m| ≤ m·2^−bits) and its application to
  integers, rounding half to even (``torch.round``, what the simulation does) or half up.
* ``requantize`` — Σ_i acc_i·m_i → clamp(⌊·⌉ + z, q_min, q_max). ``method='dyadic'`` (default):
  M_i·2^−N with one N per element, M up to 31 bits but at most 52 − bitlen(Σ|acc|) so that
  Σ acc_i·M_i is an exact float64 integer (then float64 is just a fast int64; else int64 with a
  rounding shift). ``'float'``: float64 products (relative error ≤ 2^−52). Either way the result
  is the exactly rounded Σ acc·m except within (Σ|acc_i|·m_i)·2^−(bits of M) of a rounding tie,
  where it is one code off: bound ≤ 1 code (asserted against exact rational arithmetic).
* ``int8_bmm`` — batched int8 × int8 → int32 GEMM through ``torch._int_mm``: exact.
* ``int_qk_matmul`` — Σ_d (q − z_q)(k − z_k) on uniform codes (≤ 8 bits, per-tensor or per-head
  integer zero points): int8 GEMM of the offset codes plus integer zero-point corrections:
  exact (int32 / int64 accumulator).
* ``qk_logit_codes`` — that accumulator requantized (dyadic) to the codes of the logit quantizer,
  the attention scale folded into the multiplier m = Δ_q·Δ_k·scale/Δ_logit: ≤ 1 code.
* ``pow2_matmul`` — P·V for probabilities whose values are mant·2^−shift·c (log2 / LIS: mant 1;
  log√2: an even and an odd class, the odd one scaled by 1/√2 — RepQ-ViT's log2 + parity form;
  AdaLog: mant = the LUT entry on its 1/G grid, shift = ⌊code·q/r⌋ — shift + LUT; PTQ4ViT twin
  uniform: mant = magnitude, shift = 0 or the split exponent): the shifts are grouped so that
  every operand −mant·2^k fits int8 ([−128, −1]), one int8 GEMM per group present (value codes
  with a column of ones appended give the zero-point term), groups aligned by shifts: exact
  int64 while the shift span is ≤ 40 bits (LIS 4-bit: 15, log√2 4-bit: 7); beyond that the
  groups are combined in float64 (relative error ≤ 2^−50). Only the final per-class factor
  (1/√2, Δ, 1/G) is irrational / float: it goes into the requantization multiplier.
* ``IntegerAttention`` — a calibrated ``QuantTimmAttention`` run on codes (qkv codes or values
  in, ``proj_input`` codes or values out); its own constants as buffers + ``config()`` (export).
  FQ-ViT (LIS) runs a fused chunked path of the same integer steps; softmax stays float only
  for the methods that keep it float (PTQ4ViT, RepQ-ViT, AdaLog; and FQ-ViT without LIS):
  their logits are the exact integer accumulator times Δ_q·Δ_k·scale, in float32.

Agreement with the simulation (``AttentionQuantizers.attend``, float32), stage by stage: the
integer kernels are exact up to their one requantization rounding, the simulation is not
(float32 products and sums). So (1) the logit codes equal the simulated ones except where the
simulated float32 logit lies within its rounding error of a rounding tie: ≤ 1 code there;
(2) given the same logit codes the Log-Int-Softmax codes are bit-exact (``softmax.py``); (3)
given the same probability codes, P·V + requantization is ≤ 1 code from the simulation. End to
end, a logit (or, for float softmax, a probability) code flipped by (1) changes a whole row of
probabilities, which can move an output by more than one code: measured on the real DeiT-Tiny
(16 val1300 images, 12 blocks, 7.26 M proj_input codes): FQ-ViT 8/8/4 0.0032 % of the codes
differ (max 5 codes), RepQ-ViT W4A4 0.0001 % (max 1), AdaLog 6/6 0.0003 % (max 1).
"""
import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..quantizers.base import broadcast_param, is_integral, scratch
from ..quantizers.log import log_code_of, log_code_thresholds

ROUNDINGS = ('half_even', 'half_up')


# ---------------------------------------------------------------------------------------------
# Dyadic multipliers and requantization
# ---------------------------------------------------------------------------------------------
def dyadic_multiplier(scale, bits: int = 31) -> Tuple[torch.Tensor, torch.Tensor]:
    """m → (M, N), int64 tensors of m's shape, with m ≈ M·2^−N and 2^(bits−1) ≤ M < 2^bits.

    M = ⌊m·2^N⌉ with N = bits − e where m = f·2^e, f ∈ [0.5, 1), so |M·2^−N − m| ≤ 2^(−N−1)
    ≤ m·2^−bits. N may be negative for m ≥ 2^bits (then apply multiplies by 2^−N).
    """
    if not 2 <= bits <= 62:
        raise ValueError(f'dyadic_multiplier: bits must lie in [2, 62], got {bits}')
    m = torch.as_tensor(scale, dtype=torch.float64)
    if m.numel() == 0 or not bool(torch.isfinite(m).all()) or not bool((m > 0).all()):
        raise ValueError(f'dyadic_multiplier: multipliers must be finite and positive, got {m}')
    frac, exp = torch.frexp(m)
    M = torch.round(torch.ldexp(frac, torch.tensor(bits, dtype=torch.int64))).to(torch.int64)
    N = bits - exp.to(torch.int64)
    top = M == 2 ** bits                      # f·2^bits rounded up to the next power of two
    M = torch.where(top, torch.full_like(M, 2 ** (bits - 1)), M)
    N = torch.where(top, N - 1, N)
    return M, N


def rounding_shift(x: torch.Tensor, n, rounding: str = 'half_even') -> torch.Tensor:
    """⌊x / 2^n⌉ for int64 x and integer n ≥ 0 (tensor or int, broadcast), rounding ties half
    to even (``torch.round``) or half up (+2^(n−1) then floor); n < 0 multiplies by 2^−n."""
    if rounding not in ROUNDINGS:
        raise ValueError(f'rounding must be one of {ROUNDINGS}, got {rounding!r}')
    x = x.to(torch.int64)
    n = torch.as_tensor(n, dtype=torch.int64, device=x.device)
    pos = n.clamp(min=0)
    fl = torch.bitwise_right_shift(x, pos)           # arithmetic shift: floor
    rem = x - torch.bitwise_left_shift(fl, pos)
    half = torch.bitwise_right_shift(torch.bitwise_left_shift(torch.ones_like(pos), pos), 1)
    if rounding == 'half_up':
        up = (rem >= half) & (pos > 0)
    else:
        up = (rem > half) | ((rem == half) & (pos > 0) & (torch.bitwise_and(fl, 1) == 1))
    y = fl + up.to(torch.int64)
    if bool((n < 0).any()):
        y = torch.where(n < 0, torch.bitwise_left_shift(x, (-n).clamp(min=0)), y)
    return y


def apply_dyadic(x: torch.Tensor, M, N, rounding: str = 'half_even') -> torch.Tensor:
    """⌊x·M / 2^N⌉ in int64 (see ``rounding_shift``); raises OverflowError if x·M could
    leave int64."""
    x = x.to(torch.int64)
    M = torch.as_tensor(M, dtype=torch.int64, device=x.device)
    xmax = int(x.abs().max()) if x.numel() else 0
    if xmax * int(M.abs().max()) >= 2 ** 63:
        raise OverflowError(f'apply_dyadic: |x|·M reaches {xmax} × {int(M.abs().max())} ≥ 2^63')
    return rounding_shift(x * M, N, rounding)


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def dyadic_values(multipliers, bound: int, bits: int = 31):
    """The dyadic multipliers ``requantize`` uses for accumulators with Σ_i |acc_i| ≤ ``bound``:
    ``(values, exact_f64)``. ``values`` are float64 tensors M_i·2^−N (exactly representable),
    M_i = ⌊m_i·2^N⌉ with one N per element from the largest m_i and M up to
    eff = min(bits, 52 − bitlen(bound)) bits, so that Σ acc_i·M_i < 2^52 and the whole sum is
    exact in float64 (``exact_f64``); where that leaves fewer than 16 bits, eff = min(bits,
    61 − bitlen(bound)) and the sum must be formed in int64 (``exact_f64`` False)."""
    mults = [torch.as_tensor(m, dtype=torch.float64) for m in multipliers]
    eff = min(bits, 52 - max(int(bound), 1).bit_length())
    exact_f64 = eff >= 16
    if not exact_f64:
        eff = min(bits, 61 - max(int(bound), 1).bit_length())
        if eff < 16:
            raise OverflowError(f'requantize: accumulators up to {bound} leave fewer than 16 bits '
                                'for the dyadic multiplier; use method="float"')
    top = mults[0]
    for m in mults[1:]:
        top = torch.maximum(top, m.to(top.device))
    _, N = dyadic_multiplier(top, eff)
    N = N.to(top.device)
    values = [torch.ldexp(torch.round(torch.ldexp(m, N.to(m.device))), -N.to(m.device))
              for m in mults]
    return values, N, exact_f64


def requantize(accs, multipliers, zero_point, qmin: int, qmax: int, method: str = 'dyadic',
               rounding: str = 'half_even', bits: int = 31, bound: Optional[int] = None,
               out_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """clamp(⌊Σ_i acc_i·m_i⌉ + z, q_min, q_max) for integer accumulators ``accs`` (a tensor or a
    list) and positive multipliers ``multipliers`` (floats or tensors broadcasting against the
    accumulators, one per accumulator); ``zero_point`` must be integer-valued. ``bound``: a known
    bound on Σ_i |acc_i| (skips a pass over the data).

    ``method='dyadic'``: m_i → M_i·2^−N (``dyadic_values``; one N per element), then
    ⌊Σ acc_i·M_i / 2^N⌉ — evaluated in float64 where every product and the sum are exact
    integers times 2^−N (then identical to the int64 evaluation), else in int64 with a rounding
    shift. ``method='float'``: ⌊Σ acc_i·m_i⌉ with float64 products (accumulators < 2^53).
    """
    accs, mults = _as_list(accs), _as_list(multipliers)
    if len(accs) != len(mults):
        raise ValueError(f'requantize: {len(accs)} accumulators but {len(mults)} multipliers')
    if rounding not in ROUNDINGS:
        raise ValueError(f'rounding must be one of {ROUNDINGS}, got {rounding!r}')
    dev = accs[0].device
    mults = [torch.as_tensor(m, dtype=torch.float64, device=dev) for m in mults]
    z = torch.as_tensor(zero_point, device=dev)
    if not is_integral(z):
        raise ValueError(f'requantize: the output zero point must be integer-valued, got {z}')
    if bound is None:
        bound = sum(int(a.abs().max()) if a.numel() else 0 for a in accs)
    if method == 'float':
        if bound >= 2 ** 53:
            raise OverflowError('requantize(method="float"): accumulator ≥ 2^53')
        exact_f64 = True
    elif method == 'dyadic':
        mults, N, exact_f64 = dyadic_values(mults, bound, bits)
    else:
        raise ValueError(f"requantize: method must be 'dyadic' or 'float', got {method!r}")
    if exact_f64:
        total = None
        for a, m in zip(accs, mults):
            t = torch.mul(a, m) if a.dtype == torch.float64 else a.to(torch.float64).mul_(m)
            total = t if total is None else total.add_(t)
        if rounding == 'half_even':
            y = torch.round(total)
        else:                                  # total − ⌊total⌋ is exact (multiples of 2^−N)
            y = torch.floor(total)
            y = y.add_((total - y >= 0.5).to(y.dtype))
    else:
        total = None
        for a, m in zip(accs, mults):
            t = a.to(torch.int64) * torch.round(torch.ldexp(m, N)).to(torch.int64)
            total = t if total is None else total.add_(t)
        y = rounding_shift(total, N, rounding)
    y = y.add_(z.to(y.dtype)) if y.dtype == torch.float64 else y + z.to(y.dtype)
    return y.clamp_(qmin, qmax).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# int8 GEMMs
# ---------------------------------------------------------------------------------------------
def int8_offset(qmin: int, qmax: int) -> int:
    """Offset o with [q_min − o, q_max − o] inside int8 (codes of at most 8 bits)."""
    if qmax - qmin > 255:
        raise ValueError(f'int8 GEMM operands need codes of at most 8 bits, got [{qmin}, {qmax}]')
    return (qmin + qmax + 1) // 2


def to_int8(codes: torch.Tensor, offset: int) -> torch.Tensor:
    """codes − offset as a contiguous int8 tensor (GEMM operands; the values must fit)."""
    if offset == 0 and codes.dtype == torch.int8:
        return codes.contiguous()
    if codes.dtype in (torch.uint8, torch.int8, torch.bool):
        codes = codes.to(torch.int16)
    out = torch.empty(codes.shape, dtype=torch.int8, device=codes.device)
    return out.copy_(codes - offset if offset else codes)


def _pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if x.shape[dim] >= size:
        return x
    pad = list(x.shape)
    pad[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad)], dim=dim)


def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (…, M, K) @ b (…, K, N), int8 × int8 → int32, exact (|K|·2^14 < 2^31).

    ``torch._int_mm`` per matrix of the flattened batch (CPU: any shapes; CUDA: M, K, N padded
    with zeros to its alignment, which changes nothing)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f'int8_bmm: int8 operands expected, got {a.dtype} and {b.dtype}')
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    if b.shape[-2] != K:
        raise ValueError(f'int8_bmm: inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}')
    a3 = a.expand(*batch, M, K).reshape(-1, M, K)
    b3 = b.expand(*batch, K, N).reshape(-1, K, N)
    if a.device.type == 'cpu':
        from . import kernels
        ops = kernels.native()
        if ops is not None:           # the same per-matrix GEMMs, the loop in C++ over threads
            return ops.bmm_int8(a3, b3).reshape(*batch, M, N)
    out = torch.empty((a3.shape[0], M, N), dtype=torch.int32, device=a.device)
    if a.device.type == 'cuda':
        Mp, Kp, Np = max(M, 17), max(-(-K // 8) * 8, 16), max(-(-N // 8) * 8, 8)
        a3 = _pad_to(_pad_to(a3, 1, Mp), 2, Kp)
        b3 = _pad_to(_pad_to(b3, 1, Kp), 2, Np)
        for i in range(a3.shape[0]):
            out[i] = torch._int_mm(a3[i], b3[i])[:M, :N]
    else:
        for i in range(a3.shape[0]):
            torch._int_mm(a3[i], b3[i], out=out[i])
    return out.reshape(*batch, M, N)


def _zero_int(z, offset: int, who: str) -> torch.Tensor:
    z = torch.as_tensor(z)
    if not is_integral(z):
        raise ValueError(f'{who}: integer GEMMs need an integer-valued zero point, got {z}')
    return z.round().to(torch.int64) - offset


def int_qk_matmul(q_codes: torch.Tensor, k_codes: torch.Tensor, q_zero, k_zero,
                  q_range: Tuple[int, int], k_range: Tuple[int, int]) -> torch.Tensor:
    """Σ_d (q − z_q)(k − z_k): (…, Nq, d) × (…, Nk, d) codes → (…, Nq, Nk) int32, exact.

    Zero points are integer-valued scalars or tensors broadcasting against the codes with size 1
    on the last two dims (per head). With int8 operands a = q − o_q, b = k − o_k and
    z' = z − o: Σ(a − z'_q)(b − z'_k) = a·bᵀ − z'_k·Σ_d a − z'_q·Σ_d b + d·z'_q·z'_k.
    """
    oq, ok = int8_offset(*q_range), int8_offset(*k_range)
    d = q_codes.shape[-1]
    zq = _zero_int(q_zero, oq, 'int_qk_matmul').to(q_codes.device)
    zk = _zero_int(k_zero, ok, 'int_qk_matmul').to(q_codes.device)
    for z in (zq, zk):
        if z.dim() >= 2 and (z.shape[-1] != 1 or z.shape[-2] != 1):
            raise ValueError('int_qk_matmul: zero points must be constant over tokens and '
                             f'channels (per tensor or per head), got shape {tuple(z.shape)}')
    a, b = to_int8(q_codes, oq), to_int8(k_codes, ok)
    acc = int8_bmm(a, b.transpose(-2, -1))
    zq_max, zk_max = int(zq.abs().max()), int(zk.abs().max())
    bound = d * (128 + zq_max) * (128 + zk_max)
    dt = torch.int32 if bound < 2 ** 31 else torch.int64
    acc = acc.to(dt)
    if zk_max:
        acc -= (a.sum(dim=-1, keepdim=True, dtype=dt) * zk.to(dt))
    if zq_max:
        acc -= (b.sum(dim=-1, dtype=dt).unsqueeze(-2) * zq.to(dt))
    if zq_max and zk_max:
        acc += (d * zq * zk).to(dt)
    return acc


# ---------------------------------------------------------------------------------------------
# P·V on power-of-two-structured probability codes
# ---------------------------------------------------------------------------------------------
def _group_width(max_mant: int) -> int:
    """Shifts per group so that mant·2^k ≤ 128 for k < width."""
    if not 1 <= max_mant <= 128:
        raise ValueError(f'pow2_matmul: mantissas must lie in [1, 128], got max {max_mant}')
    return 1 + int(math.floor(math.log2(128 / max_mant)))


def pow2_matmul(index: torch.Tensor, mant_table: torch.Tensor, shift_table: torch.Tensor,
                v_codes: torch.Tensor, v_zero, v_range: Tuple[int, int],
                counts: Optional[torch.Tensor] = None):
    """Σ_j mant_j·2^−shift_j·(v_j − z_v) with mant_j = mant_table[index_j] (0: no contribution),
    shift_j = shift_table[index_j]; returns ``(acc, frac_bits)`` with the result acc·2^−frac_bits
    (int64, exact; float64 where the shift span exceeds 40 bits, relative error ≤ 2^−50).

    ``index``: (…, N, N) int (table rows), ``v_codes``: (…, N, d) uniform codes with zero
    point ``v_zero`` (integer-valued, per tensor or per head). ``counts``: optional histogram of
    ``index`` (skips the bincount). One int8 GEMM per group of shifts present, on operands
    −mant·2^(top_g − shift) ∈ [−128, −1]; the value codes get a column of ones so that the same
    GEMM returns Σ_j P_j for the zero-point term.
    """
    dev = v_codes.device
    mant_table = mant_table.to(device=dev, dtype=torch.int64)
    shift_table = shift_table.to(device=dev, dtype=torch.int64)
    live = mant_table > 0
    if counts is None:
        counts = torch.bincount(index.reshape(-1).to(torch.int64), minlength=mant_table.numel())
    present = (counts[:mant_table.numel()].to(dev) > 0) & live
    d = v_codes.shape[-1]
    ov = int8_offset(*v_range)
    zv = _zero_int(v_zero, ov, 'pow2_matmul').to(dev)
    out_shape = torch.broadcast_shapes(index.shape[:-2], v_codes.shape[:-2]) + \
        (index.shape[-2], d)
    if not bool(present.any()):
        return torch.zeros(out_shape, dtype=torch.int64, device=dev), 0
    w = _group_width(int(mant_table[live].max()))
    groups = sorted(set((shift_table[present] // w).tolist()))
    tops = [g * w + w - 1 for g in groups]
    frac = max(tops)
    v8 = to_int8(v_codes, ov)
    v_aug = torch.cat([v8, torch.ones_like(v8[..., :1])], dim=-1)
    idx = index.reshape(-1)
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int32)
    exact = frac - min(tops) <= 40
    acc = None
    for g, top in zip(groups, tops):
        in_g = live & (torch.div(shift_table, w, rounding_mode='floor') == g)
        op = torch.where(in_g, -mant_table * torch.bitwise_left_shift(
            torch.ones_like(shift_table), (top - shift_table).clamp(min=0)), torch.zeros_like(mant_table))
        p = op.to(torch.int8).index_select(0, idx).reshape(index.shape)
        r = int8_bmm(p, v_aug).to(torch.int64)
        s = r[..., d:] * zv - r[..., :d]              # Σ P·(v' − z'), P = −operand
        if exact:
            s = torch.bitwise_left_shift(s, frac - top)
        else:
            s = s.to(torch.float64) * 2.0 ** (frac - top)
        acc = s if acc is None else acc.add_(s)
    return acc, frac


def split_mantissas(mant: torch.Tensor, shift: torch.Tensor, factor: float):
    """[(mant, shift, factor)] classes with every mantissa ≤ 128: mantissas above 128 (AdaLog's
    8-bit LUT grid G = 510) split into mant >> 7 (factor ·2^7) and mant & 127."""
    if int(mant.max()) <= 128:
        return [(mant, shift, factor)]
    return [(torch.bitwise_right_shift(mant, 7), shift, factor * 128.0),
            (torch.bitwise_and(mant, 127), shift, factor)]


def log2_tables(bits: int):
    """(mant, shift) tables indexed by code + 1 for log2 codes (x̂ = 2^−code, ``ZERO_CODE`` = −1)."""
    codes = torch.arange(-1, 2 ** bits, dtype=torch.int64)
    return (codes >= 0).to(torch.int64), codes.clamp(min=0)


def log_sqrt2_tables(bits: int):
    """Two classes for log√2 codes (x̂ = 2^(−code/2)), indexed by code + 1: even codes
    (mant 1, shift code/2, factor 1) and odd codes (mant 1, shift (code − 1)/2, factor 1/√2):
    2^(−c/2) = 2^(−(c−1)/2)/√2 for odd c — RepQ-ViT's log2 + parity form."""
    codes = torch.arange(-1, 2 ** bits, dtype=torch.int64)
    valid = codes >= 0
    even = valid & (codes % 2 == 0)
    odd = valid & (codes % 2 == 1)
    return [(even.to(torch.int64), torch.div(codes.clamp(min=0), 2, rounding_mode='floor'), 1.0),
            (odd.to(torch.int64), torch.div((codes - 1).clamp(min=0), 2, rounding_mode='floor'),
             1.0 / math.sqrt(2.0))]


def adalog_tables(bits: int, q: int, r: int):
    """AdaLog codes (x̂ = Δ·2^(−⌊c·q/r⌋)·T̂[(c·q) mod r], T̂ = L/G on the grid G = 2^(b+1) − 2),
    indexed by code + 1: mant = L (integer ≤ G), shift = ⌊c·q/r⌋, factor Δ/G (Δ applied by the
    caller)."""
    grid = 2 ** (bits + 1) - 2
    codes = torch.arange(-1, 2 ** bits, dtype=torch.int64)
    valid = codes >= 0
    e = codes.clamp(min=0) * int(q)
    j = torch.arange(r, dtype=torch.float64)
    lut_int = torch.round(torch.exp2(-j / r) * grid).to(torch.int64)   # = adalog_lut · G
    mant = torch.where(valid, lut_int[e % r], torch.zeros_like(e))
    return mant, torch.div(e, r, rounding_mode='floor'), 1.0 / grid


def twin_softmax_tables(bits: int, split_exp: int):
    """PTQ4ViT twin-uniform softmax codes (MSB = large region), indexed by code + 1 (row 0
    unused): mant = magnitude, shift = 0 (large, Δ_R2 = 1/n) or the split exponent i (small,
    Δ_R1 = 2^−i/n), factor 1/n."""
    n = 2 ** (bits - 1) - 1
    codes = torch.arange(-1, 2 ** bits, dtype=torch.int64)
    valid = codes >= 0
    large = torch.bitwise_and(torch.bitwise_right_shift(codes.clamp(min=0), bits - 1), 1) == 1
    mag = torch.bitwise_and(codes.clamp(min=0), n)
    mant = torch.where(valid, mag, torch.zeros_like(mag))
    shift = torch.where(large, torch.zeros_like(mag), torch.full_like(mag, int(split_exp)))
    return mant, shift, 1.0 / n


F32_INF_BITS = 0x7F800000


def log_code_buckets(code_of, bits: int, max_fine_bits: int = 8):
    """(shift, base, inc, thr) that compute the codes of ``code_of`` without a logarithm, or None
    where no table of at most 2^(8 + max_fine_bits) buckets does (or the code is not monotone).

    With T the exact float32 thresholds (``log_code_thresholds``: code(u) > k ⟺ u < T[k]), the
    code of u ≥ 0 is #{k : u < T[k]} (2^b: the zero code). Non-negative float32 values order as
    their bit patterns, so bucket k = (bits of u) >> shift holds a contiguous range of values;
    shift = 23 − m is the largest (m the fewest mantissa bits) that leaves at most one distinct
    threshold strictly inside any bucket. Then code = base[k] + inc[k]·[u < thr[k]], with base
    the thresholds above the bucket, thr that threshold and inc how many T share it (else 0)."""
    try:
        t = log_code_thresholds(code_of, bits)
    except ValueError:
        return None
    tb = t.view(torch.int32).to(torch.int64)
    values, counts = torch.unique(tb, return_counts=True)
    asc = tb.sort().values
    for m in range(max_fine_bits + 1):
        shift = 23 - m
        inside = (values & ((1 << shift) - 1)) != 0        # not a bucket's first value
        owner = values[inside] >> shift
        if torch.unique(owner).numel() != owner.numel():
            continue
        n_buckets = (F32_INF_BITS >> shift) + 1
        last = ((torch.arange(n_buckets, dtype=torch.int64) + 1) << shift) - 1
        last = last.clamp(max=F32_INF_BITS)
        base = tb.numel() - torch.searchsorted(asc, last, right=True)     # #{T > last value}
        inc = torch.zeros(n_buckets, dtype=torch.int64)
        thr = torch.zeros(n_buckets, dtype=torch.int64)      # +0.0: u < thr never holds
        inc[owner] = counts[inside]
        thr[owner] = values[inside]
        return (shift, base.to(torch.int32), inc.to(torch.int32),
                thr.to(torch.int32).view(torch.float32))
    return None


def search_thresholds16(code_of, bits: int) -> torch.Tensor:
    """The exact thresholds T of codes of at most 4 bits, padded with −inf to 16 float32 values
    (code(u) = #{k : u < T[k]}; −inf never counts), for the kernels' register search; empty
    for wider codes or where ``log_code_thresholds`` has none."""
    if 2 ** bits > 16:
        return torch.empty(0)
    try:
        t = log_code_thresholds(code_of, bits)
    except ValueError:
        return torch.empty(0)
    out = torch.full((16,), float('-inf'), dtype=torch.float32)
    out[:t.numel()] = t
    return out


# ---------------------------------------------------------------------------------------------
# The attention core of a calibrated QuantTimmAttention on codes
# ---------------------------------------------------------------------------------------------
def _uniform_view(q, x: torch.Tensor, who: str):
    """(scale, zero point) of a uniform quantizer broadcast against the (B, H, N, d) operand
    ``x``; per tensor or per head (ch_axis 1), never per channel of d."""
    from ..quantizers.uniform import UniformQuantizer
    if not isinstance(q, UniformQuantizer):
        raise NotImplementedError(f'{who}: integer attention needs a UniformQuantizer on q, k, v '
                                  f'(or qkv_output), got {type(q).__name__}')
    s = broadcast_param(q.scale, x, q.ch_axis)
    z = broadcast_param(q.zero_point, x, q.ch_axis)
    for t in (s, z):
        if t.dim() >= 2 and (t.shape[-1] != 1 or t.shape[-2] != 1):
            raise NotImplementedError(f'{who}: {q.qname} varies along tokens or head channels '
                                      f'(ch_axis={q.ch_axis}); per tensor or per head only')
    return s, z


def qk_logit_codes(acc: torch.Tensor, q_scale, k_scale, attn_scale: float, logit_quantizer,
                   method: str = 'dyadic') -> torch.Tensor:
    """Codes of the (per-tensor) logit quantizer for the logits acc·Δ_q·Δ_k·scale: the attention
    scale folded into one multiplier m = Δ_q·Δ_k·scale/Δ_logit (per head if Δ_q, Δ_k are)."""
    lq = logit_quantizer
    if lq.scale.numel() != 1 or lq.zero_point.numel() != 1:
        raise NotImplementedError(f'{lq.qname}: the logit quantizer must be per tensor')
    f64 = dict(dtype=torch.float64, device=acc.device)
    m = (torch.as_tensor(q_scale).to(**f64) * torch.as_tensor(k_scale).to(**f64) * attn_scale
         / lq.scale.to(**f64).reshape(()))
    return requantize(acc, m, lq.zero_point.reshape(()), lq.qmin, lq.qmax, method=method)


PROBS_KINDS = ('lis', 'log2', 'log_sqrt2', 'adalog', 'twin', 'uniform')


def _uniform_codes(x: torch.Tensor, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """``UniformQuantizer.quantize``: clamp(⌊x/Δ⌉ + z, q_min, q_max), int32."""
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax).to(torch.int32)


def _per_head(t: torch.Tensor) -> torch.Tensor:
    """A per-tensor () or per-head (H,) parameter broadcast against (B, H, N, d)."""
    return t if t.dim() == 0 else t.view(1, -1, 1, 1)


# 'simulation': each requantization rounds the float32 value the integer-exact simulation
# (``fqvit_det.nn.exact``) computes, by the quantizer's own formula; 'dyadic' / 'float': see
# ``requantize``.
ATTENTION_METHODS = ('simulation', 'dyadic', 'float')


class IntegerAttention(nn.Module):
    """The attention core of a calibrated ``QuantTimmAttention`` on integer codes.

    Build with ``IntegerAttention(attn)`` from a calibrated attention (its quantizers are read
    once; the module keeps its own constants as buffers and holds no quantizer), or with
    ``IntegerAttention(config=cfg)`` (empty buffers of the right shapes, for loading a state
    dict); ``config()`` is the JSON that rebuilds it.

    ``forward(qkv)`` takes the qkv projection output (B, N, 3C): the integer codes of the
    ``qkv_output`` quantizer (FQ-ViT) or floats (quantized here by that quantizer, or by the
    q / k / v quantizers), and returns the ``proj_input`` codes (B, N, C) (int32), or floats
    when that role is not quantized (``dequantize=True`` returns floats in any case). Steps:

    1. QKᵀ: ``int_qk_matmul`` (int8 GEMM, exact int32);
    2. FQ-ViT LIS: logit codes by ``qk_logit_codes`` (dyadic requantization, the attention scale
       folded in), then ``int_log_softmax`` (bit-exact integer softmax); other methods (and
       FQ-ViT without LIS): float logits acc·Δ_q·Δ_k·scale (float32; through the logit
       quantizer when there is one), float softmax (the method keeps it float), probability codes
       by the method's quantizer formula;
    3. P·V: ``pow2_matmul`` on the probability codes (log2, log√2 as even/odd log2 classes,
       AdaLog shift + LUT, PTQ4ViT twin uniform), or an int8 GEMM for uniform probabilities;
       an exact accumulator;
    4. requantization to the ``proj_input`` codes (``requantize``: dyadic, or float64).

    FQ-ViT (LIS, per-tensor scales) runs a fused, chunked version of the same integer steps
    (``_lis_fast``; equal to the generic path up to the dyadic multiplier width, ≤ 1 code).
    On the CPU with 'simulation' requantization, steps 1–4 run as one compiled op per call
    (``kernels.py``: ``attention_pow2`` / ``attention_lis``, bit-identical to the torch ops),
    from the qkv output itself (``_fused_forward``) or from codes (``attend_codes``).
    Agreement with the simulation: stage by stage (see the module docstring). Not supported
    (clear error): relative-position bias, masks (Swin), q/k norms, gates.
    """

    def __init__(self, attn: Optional[nn.Module] = None, method: str = 'dyadic',
                 fast: bool = True, config: Optional[dict] = None):
        super().__init__()
        if (attn is None) == (config is None):
            raise ValueError('IntegerAttention: pass a calibrated attention module or a config')
        self.fast = fast
        self.chunk_elems = 1 << 17       # CPU: batch·head matrices per chunk of the fused path
        # compiled attention cores: the AVX-512 routes where they apply (LIS code counts, log-code
        # buckets, operand planes of 4-bit codes); False: the scalar routes, the same codes (tests)
        self.vector_kernels = True
        self._fast_cache = None
        params = None
        if attn is not None:
            config = self._read_attention(attn, method)
            params = config.pop('_params')
        self._configure(config)
        if params is not None:
            self._load_params(params)
            device = next(iter(params.values())).device
            self.to(device)

    # --- construction -------------------------------------------------------------------------
    def _configure(self, cfg: dict):
        cfg = dict(cfg)
        if cfg.get('probs') not in PROBS_KINDS:
            raise ValueError(f'IntegerAttention config: probs must be one of {PROBS_KINDS}, got '
                             f'{cfg.get("probs")!r}')
        self.cfg = cfg
        self.num_heads, self.head_dim = int(cfg['num_heads']), int(cfg['head_dim'])
        self.scale, self.method = float(cfg['scale']), cfg['method']
        if self.method not in ATTENTION_METHODS:
            raise ValueError(f'IntegerAttention: method must be one of {ATTENTION_METHODS}, got '
                             f'{self.method!r}')
        self.probs_kind = cfg['probs']
        self.kind = ('lis' if self.probs_kind == 'lis' else
                     'uniform' if self.probs_kind == 'uniform' else 'pow2')
        H, C = self.num_heads, self.num_heads * self.head_dim

        def shape(flag, n):
            return (n,) if flag else ()
        for role in ('q', 'k', 'v'):
            per = shape(cfg[f'{role}_per_head'], H)
            self.register_buffer(f'{role}_scale', torch.ones(per))
            self.register_buffer(f'{role}_zero', torch.zeros(per))
        has_logit = cfg['logit_range'] is not None
        self.register_buffer('logit_scale', torch.ones(() if has_logit else (0,)))
        self.register_buffer('logit_zero', torch.zeros(() if has_logit else (0,)))
        self.register_buffer('probs_delta', torch.ones(()))       # log2 / log√2 / AdaLog Δ
        self.register_buffer('probs_zero', torch.zeros(()))       # uniform probabilities
        self.register_buffer('probs_q', torch.zeros((), dtype=torch.int64))   # AdaLog q; twin i
        has_out = cfg['out_range'] is not None
        per_out = (C,) if cfg['out_per_channel'] else ()
        self.register_buffer('out_scale', torch.ones(per_out if has_out else (0,)))
        self.register_buffer('out_zero', torch.zeros(per_out if has_out else (0,)))

    def config(self) -> dict:
        """Constructor arguments (JSON) that rebuild an empty module for ``load_state_dict``."""
        return dict(self.cfg)

    @staticmethod
    def _read_attention(attn: nn.Module, method: str) -> dict:
        from ..quantizers.adalog import AdaLogQuantizer
        from ..quantizers.lis import LogIntSoftmax
        from ..quantizers.log import Log2Quantizer, LogSqrt2Quantizer
        from ..quantizers.twin import TwinUniformSoftmaxQuantizer
        from ..quantizers.uniform import UniformQuantizer
        aq = getattr(attn, 'aq', None)
        name = type(attn).__name__
        if aq is None:
            raise TypeError(f'IntegerAttention: {name} has no attention quantizers (aq); convert the '
                            'model with fqvit_det.convert.quantize_model first')
        for part in ('q_norm', 'k_norm', 'norm'):
            if not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
                raise NotImplementedError(f'IntegerAttention: {name}.{part} is not Identity')
        if getattr(attn, 'gate', None) is not None:
            raise NotImplementedError(f'IntegerAttention: gated attention ({name}.gate)')
        for role in ('scores', 'rel_pos_bias', 'mask'):
            if getattr(aq, role, None) is not None:
                raise NotImplementedError(f'IntegerAttention: the {role} quantizer (Swin) is not '
                                          'supported')
        qkv_q = getattr(attn.qkv, 'out_quantizer', None)
        if qkv_q is not None and (aq.q is not None or aq.k is not None or aq.v is not None):
            raise NotImplementedError('IntegerAttention: both qkv_output and q/k/v quantizers are '
                                      'set; the integer path reads one set of codes')
        if qkv_q is not None and not (isinstance(qkv_q, UniformQuantizer)
                                      and qkv_q.scale.numel() == 1):
            raise NotImplementedError(f'IntegerAttention: {qkv_q.qname} must be a per-tensor '
                                      'UniformQuantizer')
        cfg = dict(num_heads=int(attn.num_heads), head_dim=int(attn.head_dim),
                   scale=float(attn.scale), method=method, shared_qkv=qkv_q is not None)
        H = attn.num_heads
        params = {}
        for role in ('q', 'k', 'v'):
            q = getattr(aq, role) if qkv_q is None else qkv_q
            if q is None:
                raise NotImplementedError(f'IntegerAttention: {role} is not quantized (neither the '
                                          f'{role} nor the qkv_output role has a quantizer)')
            if not isinstance(q, UniformQuantizer):
                raise NotImplementedError(f'IntegerAttention: {q.qname} is '
                                          f'{type(q).__name__}; q, k, v must be uniform')
            per_head = q.scale.numel() != 1 or q.zero_point.numel() != 1
            if per_head and (q.ch_axis is None or q.ch_axis % 4 != 1 or q.scale.numel() != H):
                raise NotImplementedError(f'IntegerAttention: {q.qname} (ch_axis={q.ch_axis}) '
                                          'must be per tensor or per head (ch_axis=1)')
            int8_offset(q.qmin, q.qmax)
            cfg[f'{role}_per_head'] = per_head
            cfg[f'{role}_range'] = [q.qmin, q.qmax]
            params[f'{role}_scale'] = q.scale.reshape(-1) if per_head else q.scale.reshape(())
            zp = q.zero_point.expand(q.scale.shape) if per_head else q.zero_point
            params[f'{role}_zero'] = zp.reshape(-1) if per_head else zp.reshape(())
            if not is_integral(zp):
                raise NotImplementedError(f'IntegerAttention: {q.qname} has a fractional zero point')
        p = aq.probs
        logit_q = aq.logits
        cfg.update(probs_bits=0, lis_n=0, adalog_r=0, probs_range=None)
        if isinstance(p, LogIntSoftmax):
            cfg['probs'], logit_q = 'lis', p.logit_quant
            cfg.update(probs_bits=p.bits, lis_n=p.n)
        elif isinstance(p, Log2Quantizer):
            cfg.update(probs='log2', probs_bits=p.bits)
            params['probs_delta'] = p.delta
        elif isinstance(p, LogSqrt2Quantizer):
            cfg.update(probs='log_sqrt2', probs_bits=p.bits)
            params['probs_delta'] = p.delta
        elif isinstance(p, AdaLogQuantizer):
            if p.shift:
                raise NotImplementedError(f'{p.qname}: a shifted AdaLog quantizer on probabilities')
            cfg.update(probs='adalog', probs_bits=p.bits, adalog_r=p.r)
            params.update(probs_delta=p.delta, probs_q=p.q)
        elif isinstance(p, TwinUniformSoftmaxQuantizer):
            cfg.update(probs='twin', probs_bits=p.bits)
            params['probs_q'] = p.split_exp
        elif type(p) is UniformQuantizer and p.scale.numel() == 1:
            int8_offset(p.qmin, p.qmax)
            cfg.update(probs='uniform', probs_bits=p.bits, probs_range=[p.qmin, p.qmax])
            params.update(probs_delta=p.scale, probs_zero=p.zero_point)
            if not is_integral(p.zero_point):
                raise NotImplementedError(f'IntegerAttention: {p.qname} has a fractional zero point')
        elif p is None:
            raise NotImplementedError('IntegerAttention: the attention probabilities are not '
                                      'quantized, so P·V has no integer operand')
        else:
            raise NotImplementedError(f'IntegerAttention: probability quantizer '
                                      f'{type(p).__name__} is not supported')
        cfg['logit_range'] = None
        if logit_q is not None:
            if not (isinstance(logit_q, UniformQuantizer) and logit_q.scale.numel() == 1):
                raise NotImplementedError(f'IntegerAttention: {logit_q.qname} must be a per-tensor '
                                          'UniformQuantizer')
            cfg['logit_range'] = [logit_q.qmin, logit_q.qmax]
            params.update(logit_scale=logit_q.scale.reshape(()),
                          logit_zero=logit_q.zero_point.reshape(()))
        oq = getattr(attn.proj, 'in_quantizer', None)
        cfg.update(out_range=None, out_per_channel=False)
        if oq is not None:
            per_ch = oq.scale.numel() != 1
            if not (type(oq) is UniformQuantizer and (not per_ch or oq.ch_axis in (-1, 2))):
                raise NotImplementedError(f'IntegerAttention: proj_input quantizer {oq!r}')
            cfg.update(out_range=[oq.qmin, oq.qmax], out_per_channel=per_ch)
            params.update(out_scale=oq.scale.reshape(-1) if per_ch else oq.scale.reshape(()),
                          out_zero=(oq.zero_point.expand(oq.scale.shape).reshape(-1) if per_ch
                                    else oq.zero_point.reshape(())))
            if not is_integral(oq.zero_point):
                raise NotImplementedError(f'IntegerAttention: {oq.qname} has a fractional zero point')
        cfg['_params'] = {k: v.detach().clone() for k, v in params.items()}
        return cfg

    def _load_params(self, params: dict):
        with torch.no_grad():
            for k, v in params.items():
                buf = getattr(self, k)
                buf.copy_(v.to(buf.dtype).reshape(buf.shape))

    # --- helpers --------------------------------------------------------------------------
    def _pow2_classes(self):
        """[(mant table, shift table, real factor)] for the probability codes (index code + 1)."""
        bits, kind = self.cfg['probs_bits'], self.probs_kind
        if kind == 'lis':
            return [log2_tables(bits) + (1.0,)]
        if kind == 'log2':
            return [log2_tables(bits) + (float(self.probs_delta),)]
        if kind == 'log_sqrt2':
            return [(m, s, f * float(self.probs_delta)) for m, s, f in log_sqrt2_tables(bits)]
        if kind == 'adalog':
            m, s, f = adalog_tables(bits, int(self.probs_q), self.cfg['adalog_r'])
            return split_mantissas(m, s, f * float(self.probs_delta))
        m, s, f = twin_softmax_tables(bits, int(self.probs_q))
        return split_mantissas(m, s, f)

    def _probs_codes(self, probs: torch.Tensor) -> torch.Tensor:
        """The probability quantizer's ``quantize`` (same formulas)."""
        from ..quantizers.adalog import adalog_quantize
        from ..quantizers.log import log2_quantize, log_sqrt2_quantize
        from ..quantizers.twin import twin_softmax_codes
        kind, bits = self.probs_kind, self.cfg['probs_bits']
        if kind == 'log2':
            return log2_quantize(probs, self.probs_delta, bits)
        if kind == 'log_sqrt2':
            return log_sqrt2_quantize(probs, self.probs_delta, bits)
        if kind == 'adalog':
            return adalog_quantize(probs, self.probs_delta, self.probs_q, bits,
                                   self.cfg['adalog_r'])
        if kind == 'twin':
            return twin_softmax_codes(probs, self.probs_q, bits)
        lo, hi = self.cfg['probs_range']
        return _uniform_codes(probs, self.probs_delta, self.probs_zero, lo, hi)

    def split(self, qkv: torch.Tensor):
        """(q, k, v) codes (B, H, N, d) from the qkv output (codes of ``qkv_output`` or floats)."""
        B, N, _ = qkv.shape
        cfg = self.cfg
        if cfg['shared_qkv'] and qkv.is_floating_point():
            qkv = _uniform_codes(qkv, self.q_scale, self.q_zero, *cfg['q_range'])
        parts = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = parts.unbind(0)
        if not cfg['shared_qkv']:
            if not qkv.is_floating_point():
                raise TypeError('IntegerAttention: float qkv expected (q, k, v have their own '
                                'quantizers)')
            q, k, v = (_uniform_codes(t, _per_head(getattr(self, f'{r}_scale')),
                                      _per_head(getattr(self, f'{r}_zero')), *cfg[f'{r}_range'])
                       for t, r in ((q, 'q'), (k, 'k'), (v, 'v')))
        return q, k, v

    def forward(self, qkv: torch.Tensor, dequantize: bool = False) -> torch.Tensor:
        out = self._fused_forward(qkv) if self.fast else None
        if out is not None:
            return self.dequantize_out(out) if dequantize else out
        return self.attend_codes(*self.split(qkv), dequantize=dequantize)

    def _qkv_operand_params(self, device):
        """Per channel of the qkv output (3·H·d): scale, zero point, code range and int8 operand
        offset of the quantizer that codes it (``split``'s formulas), float32."""
        cfg = self.cfg
        H, d = self.num_heads, self.head_dim
        from .kernels import args_key
        key = (str(device),) + args_key(*(getattr(self, f'{r}_{p}')
                                          for r in 'qkv' for p in ('scale', 'zero')))
        cache = getattr(self, '_qkv_cache', None)
        if cache is not None and cache[0] == key:
            return cache[1]
        cols = {n: [] for n in ('scale', 'zero', 'lo', 'hi', 'offset')}
        for r in 'qkv':
            src = 'q' if cfg['shared_qkv'] else r     # shared: one quantizer codes all of qkv
            lo, hi = cfg[f'{src}_range']
            for n, t in (('scale', getattr(self, f'{src}_scale')),
                         ('zero', getattr(self, f'{src}_zero'))):
                t = t.float().reshape(-1)
                cols[n].append((t.expand(H) if t.numel() == 1 else t).repeat_interleave(d))
            cols['lo'].append(torch.full((H * d,), float(lo)))
            cols['hi'].append(torch.full((H * d,), float(hi)))
            cols['offset'].append(torch.full((H * d,), float(int8_offset(*cfg[f'{r}_range']))))
        params = [torch.cat(cols[n]).to(device).contiguous()
                  for n in ('scale', 'zero', 'lo', 'hi', 'offset')]
        self._qkv_cache = (key, params)
        return params

    def _compiled_setup(self, n_tokens: int, device):
        """(compiled ops, LIS setup or None) where the compiled core runs (CPU, 'simulation'
        requantization, a supported kind, the kernels built), else None."""
        if torch.device(device).type != 'cpu' or not self.fast:
            return None
        st = None
        if self.kind == 'lis':
            if self.method != 'simulation':
                return None
            st = self._lis_setup(n_tokens, self.head_dim, device)
            if st is None:
                return None
        elif not self._pow2_applies():
            return None
        from . import kernels
        ops = kernels.native()
        return None if ops is None else (ops, st)


    def _compiled_core(self, ops, st, qa, ka, va, B):
        """Steps 1–4 on the int8 operands code − offset of q, k, v ((B·H, N, d) each) in one
        compiled op: ``attention_lis`` (FQ-ViT) or ``attention_pow2``, their int8 GEMMs on AMX
        tiles where ``kernels.amx_ops()`` says so."""
        from . import kernels
        amx = kernels.amx_ops() is not None
        if self.kind == 'lis':
            return ops.attention_lis(qa, ka, va, st['zq'], st['zk'], st['zv'], st['m_sim'],
                                     float(st['logit_scale']), st['lo'], st['hi'], st['table'],
                                     st['odd'], st['den'], len(st['tops']), st['out_step'],
                                     float(st['out_scale']), st['z_out'], *st['out_range'],
                                     self.num_heads, self.vector_kernels, amx)
        cfg = self.cfg
        c = self._pow2_consts(B, qa.device)
        plan = c['plan']
        mode, r, qq, split = self._code_mode()
        return ops.attention_pow2(qa, ka, va, c['zq_g'], c['zk_g'], c['zv_g'], c['m_g'],
                                  self.probs_delta.float(), mode, r, qq, split,
                                  cfg['probs_bits'], plan['table'], plan['classes'],
                                  plan['shifts'], plan['exact'], c['mult'], c['so'], c['zo'],
                                  *cfg['out_range'], self.num_heads,
                                  *self._code_buckets(mode, r, qq), self.vector_kernels, amx)

    def _code_buckets(self, mode: int, r: float, qq: float):
        """``attention_pow2``'s last arguments for code mode ``mode`` (``_code_mode``): the
        exact-threshold code tables (``log_code_buckets``) for log codes with one Δ, else empty
        (log2 in the kernel), and for codes of at most 4 bits the thresholds themselves
        (``search_thresholds16``)."""
        key = (mode, r, qq, int(self.cfg['probs_bits']), self.probs_delta.numel())
        cache = getattr(self, '_buckets_cache', None)
        if cache is None or cache[0] != key:
            b = None
            bits = self.cfg['probs_bits']
            if mode != 3 and self.probs_delta.numel() == 1:
                code_of = log_code_of(mode, r, qq)
                b = log_code_buckets(code_of, bits)
            empty = torch.empty(0, dtype=torch.int32)
            args = ((empty, empty, torch.empty(0), 0, torch.empty(0)) if b is None else
                    (b[1], b[2], b[3], b[0], search_thresholds16(code_of, bits)))
            cache = self._buckets_cache = (key, args)
        return cache[1]

    @torch.no_grad()
    def _compiled_codes(self, q, k, v):
        """The compiled core on q, k, v codes (B, H, N, d); None where it does not apply."""
        B, H, N, d = q.shape
        setup = self._compiled_setup(N, q.device)
        if setup is None:
            return None
        G = B * H
        operands = (to_int8(t, int8_offset(*self.cfg[f'{r}_range'])).reshape(G, N, d)
                    for t, r in ((q, 'q'), (k, 'k'), (v, 'v')))
        return self._compiled_core(*setup, *operands, B)

    @torch.no_grad()
    def _fused_forward(self, qkv: torch.Tensor, rescale=None, setup=None):
        """The compiled path from the qkv output itself: one pass codes q, k, v as int8 GEMM
        operands in head-major layout (instead of quantize → split → offset copies); None where
        it does not apply. ``rescale`` = (bias_int, acc_scale, bias_float): ``qkv`` is the qkv
        GEMM's int32 accumulator and its float output float32(acc + b_int)·Δ + bias is formed
        inside the same pass (``IntegerLinear``'s rescale, never stored). ``setup``: the
        caller's ``_compiled_setup`` result, if it already has one."""
        if qkv.device.type != 'cpu' or qkv.dim() != 3 or \
                qkv.dtype not in (torch.float32, torch.int32):
            return None
        if qkv.dtype == torch.int32 and not self.cfg['shared_qkv'] and rescale is None:
            return None
        B, N, _ = qkv.shape
        setup = setup or self._compiled_setup(N, qkv.device)
        if setup is None:
            return None
        empty = torch.empty(0)
        operands = setup[0].qkv_int8(qkv.contiguous(), *self._qkv_operand_params(qkv.device),
                                     self.num_heads, *(rescale or (empty, empty, empty)))
        return self._compiled_core(*setup, *operands.unbind(0), B)

    @torch.no_grad()
    def _tiles_forward(self, tiles, rescale, setup, batch: int):
        """``_fused_forward`` for a qkv GEMM on AMX tiles: ``tiles`` = (ops, a, packed) of
        ``IntegerLinear.tile_operands`` (``batch`` images of a's rows), whose product the coding
        pass computes block by block with the rescale ``rescale``; ``setup`` as there."""
        ops, a, packed = tiles
        operands = ops.tiles_qkv_int8(a, packed, rescale[0].numel(), batch,
                                      *self._qkv_operand_params(a.device), self.num_heads,
                                      *rescale)
        return self._compiled_core(*setup, *operands.unbind(0), batch)

    def dequantize_out(self, codes: torch.Tensor) -> torch.Tensor:
        """``proj_input`` codes → values, as ``UniformQuantizer.dequantize``."""
        return (codes.to(self.out_scale.dtype) - self.out_zero) * self.out_scale

    @torch.no_grad()
    def attend_codes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dequantize: bool = False) -> torch.Tensor:
        """Steps 1–4 on q, k, v codes (B, H, N, d)."""
        if self.fast:
            out = self._compiled_codes(q, k, v)
            if out is None and self.kind == 'lis':
                out = self._lis_fast(q, k, v)
            if out is not None:
                return self.dequantize_out(out) if dequantize else out
        B, H, N = q.shape[0], q.shape[1], q.shape[2]
        cb = max(1, self.chunk_elems // (H * N * N)) if q.device.type == 'cpu' else B
        if cb < B:       # images are independent: chunks keep the intermediates in cache
            return torch.cat([self.attend_codes(q[i:i + cb], k[i:i + cb], v[i:i + cb],
                                                dequantize)
                              for i in range(0, B, cb)])
        return self.pv_codes(self.probability_codes(q, k), v, dequantize)

    @torch.no_grad()
    def probability_codes(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Steps 1–2: the probability codes (B, H, N, N) of the method's quantizer (LIS: log2
        codes of the integer softmax)."""
        from ..quantizers.uniform import fake_quant_uniform
        from .softmax import int_log_softmax
        cfg = self.cfg
        sq, zq = _per_head(self.q_scale), _per_head(self.q_zero)
        sk, zk = _per_head(self.k_scale), _per_head(self.k_zero)
        acc = int_qk_matmul(q, k, zq, zk, tuple(cfg['q_range']), tuple(cfg['k_range']))
        if self.kind == 'lis':
            lo, hi = cfg['logit_range']
            f64 = dict(dtype=torch.float64, device=acc.device)
            m = sq.to(**f64) * sk.to(**f64) * self.scale / self.logit_scale.to(**f64)
            # the analytic bound of ``int_qk_matmul`` (as the fast path): one multiplier width
            zq_, zk_ = (int(float((z - int8_offset(*cfg[f'{r}_range'])).abs().max()))
                        for z, r in ((self.q_zero, 'q'), (self.k_zero, 'k')))
            bound = q.shape[-1] * (128 + zq_) * (128 + zk_)
            if self.method == 'simulation':
                logits = (acc.to(torch.float64) * (sq.double() * sk.double() * self.scale)).float()
                lcodes = _uniform_codes(logits, self.logit_scale, self.logit_zero, lo, hi)
            else:
                lcodes = requantize(acc, m, self.logit_zero, lo, hi, method=self.method,
                                    bound=bound)
            pcodes = int_log_softmax(lcodes, float(self.logit_scale), cfg['probs_bits'],
                                     cfg['lis_n'], lo, hi)
        else:
            logits = (acc.to(torch.float64) * (sq.double() * sk.double() * self.scale)).float()
            if cfg['logit_range'] is not None:
                logits = fake_quant_uniform(logits, self.logit_scale, self.logit_zero,
                                            *cfg['logit_range'])
            pcodes = self._probs_codes(logits.softmax(dim=-1))
        return pcodes

    @torch.no_grad()
    def pv_codes(self, pcodes: torch.Tensor, v: torch.Tensor,
                 dequantize: bool = False) -> torch.Tensor:
        """Steps 3–4: P·V on probability codes (B, H, N, N) and value codes (B, H, N, d), an
        exact accumulator, requantized to the ``proj_input`` codes (B, N, C) (≤ 1 code from the
        exactly rounded value)."""
        cfg = self.cfg
        sv, zv = _per_head(self.v_scale), _per_head(self.v_zero)
        f64 = dict(dtype=torch.float64, device=v.device)
        v_range = tuple(cfg['v_range'])
        if self.kind == 'uniform':
            vt = v.transpose(-2, -1)                  # Σ_j P_ij V_jd = (P · (Vᵀ)ᵀ)
            pv = int_qk_matmul(pcodes, vt, self.probs_zero, zv, tuple(cfg['probs_range']),
                               v_range)
            terms = [(pv.to(torch.int64), self.probs_delta.to(**f64) * sv.to(**f64))]
        else:
            index = pcodes.to(torch.int32) + 1
            counts = torch.bincount(index.reshape(-1).to(torch.int64),
                                    minlength=2 ** cfg['probs_bits'] + 1)
            terms = []
            for mant, shift, factor in self._pow2_classes():
                a, frac = pow2_matmul(index, mant, shift, v, zv, v_range, counts)
                terms.append((a, sv.to(**f64) * (factor * 2.0 ** -frac)))
        # (B, H, N, d) → (B, N, H, d): the proj input layout; multipliers follow
        accs = [a.transpose(1, 2) for a, _ in terms]
        mults = [m.transpose(1, 2) if m.dim() == 4 else m for _, m in terms]
        B, H, N, d = v.shape[0], self.num_heads, pcodes.shape[-2], self.head_dim
        if cfg['out_range'] is None:
            out = None
            for a, m in zip(accs, mults):
                t = a.to(torch.float64) * m
                out = t if out is None else out + t
            return out.float().reshape(B, N, H * d)
        so = self.out_scale if self.out_scale.dim() == 0 else self.out_scale.view(H, d)
        zo = self.out_zero if self.out_zero.dim() == 0 else self.out_zero.view(H, d)
        if self.method == 'simulation':
            out = None
            for a, m in zip(accs, mults):
                t = a.to(torch.float64) * m
                out = t if out is None else out + t
            codes = _uniform_codes(out.float(), so, zo, *cfg['out_range'])
        else:
            mults = [m / so.to(**f64) for m in mults]
            codes = requantize(accs, mults, zo, *cfg['out_range'], method=self.method)
        codes = codes.reshape(B, N, H * d)
        return self.dequantize_out(codes) if dequantize else codes

    def extra_repr(self):
        return (f'heads={self.num_heads}, head_dim={self.head_dim}, probs={self.probs_kind}, '
                f'method={self.method}')

    # --- compiled path for float softmax + power-of-two probability codes ----------------------
    # The generic steps 1–4 as one compiled op (``kernels.py``'s ``attention_pow2``) in place of
    # the chains of whole-tensor ops (same arithmetic, bit for bit): the logits from the int8
    # GEMM and the zero-point sums, softmax (torch's own), the probability codes, the int8 GEMM
    # operands of every P·V plane, the planes' products combined and requantized to the
    # proj-input codes.
    def _pow2_plan(self, device):
        """Per plane (class, group): the int8 operand table indexed by code + 1, the class, the
        left shift into the class accumulator; per class: exact (int64) or float64, and the
        factor Δ·c·2^−frac of the multiplier."""
        key = (str(device), float(self.probs_delta), int(self.probs_q))
        if getattr(self, '_plan_cache', None) is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        tables, classes, shifts, exact, factors = [], [], [], [], []
        for c, (mant, shift, factor) in enumerate(self._pow2_classes()):
            mant, shift = mant.to(torch.int64), shift.to(torch.int64)
            live = mant > 0
            w = _group_width(int(mant[live].max())) if bool(live.any()) else 1
            groups = sorted(set((shift[live] // w).tolist()))
            tops = [g * w + w - 1 for g in groups]
            frac = max(tops) if tops else 0
            for g, top in zip(groups, tops):
                in_g = live & (torch.div(shift, w, rounding_mode='floor') == g)
                op = torch.where(in_g, -mant * torch.bitwise_left_shift(
                    torch.ones_like(shift), (top - shift).clamp(min=0)), torch.zeros_like(mant))
                tables.append(op.to(torch.int8))
                classes.append(c)
                shifts.append(frac - top)
            exact.append(not tops or frac - min(tops) <= 40)
            factors.append(factor * 2.0 ** -frac)
        plan = dict(table=torch.stack(tables).to(device), classes=torch.tensor(classes),
                    shifts=torch.tensor(shifts), exact=torch.tensor(exact), factors=factors)
        self._plan_cache = (key, plan)
        return plan

    def _code_mode(self):
        """(mode, r, q, split) of the compiled kernels' probability codes: from log2(x/Δ) for
        log2 (0), log√2 (1), AdaLog (2: r, q); twin uniform (3: Δ_R1, Δ_R2, split s)."""
        if self.probs_kind == 'log2':
            return 0, 1.0, 1.0, 0.0
        if self.probs_kind == 'log_sqrt2':
            return 1, 1.0, 1.0, 0.0
        if self.probs_kind == 'adalog':
            return 2, float(self.cfg['adalog_r']), float(self.probs_q), 0.0
        from ..quantizers.twin import twin_softmax_steps
        s, d1, d2 = twin_softmax_steps(self.probs_q, self.cfg['probs_bits'])
        return 3, float(d1), float(d2), float(s)

    def _pow2_applies(self) -> bool:
        cfg = self.cfg
        return (self.kind == 'pow2' and self.method == 'simulation'
                and cfg['out_range'] is not None and cfg['logit_range'] is None)

    def _pow2_consts(self, B: int, dev):
        """Per-matrix constants of ``attention_pow2`` for a batch of B images (cached)."""
        from .kernels import args_key
        key = (B, str(dev)) + args_key(*(getattr(self, n) for n in (
            'q_scale', 'q_zero', 'k_scale', 'k_zero', 'v_scale', 'v_zero', 'out_scale',
            'out_zero', 'probs_delta', 'probs_q')))
        cache = getattr(self, '_pow2_consts_cache', None)
        if cache is not None and cache[0] == key:
            return cache[1]
        cfg = self.cfg
        H = self.num_heads
        f64 = dict(dtype=torch.float64, device=dev)
        i64 = dict(dtype=torch.int64, device=dev)

        def per_g(t, n, **kw):     # a per-tensor / per-head parameter → one value per matrix
            t = t.to(**kw).reshape(-1)
            return (t.expand(H) if t.numel() == 1 else t).repeat(n).contiguous()
        oq, ok, ov = (int8_offset(*cfg[f'{r}_range']) for r in ('q', 'k', 'v'))
        zq, zk, zv = (_zero_int(getattr(self, f'{r}_zero'), o, 'IntegerAttention')
                      for r, o in (('q', oq), ('k', ok), ('v', ov)))
        plan = self._pow2_plan(dev)
        m = self.q_scale.to(**f64) * self.k_scale.to(**f64) * self.scale
        sv = self.v_scale.to(**f64)
        c = dict(plan=plan, so=self.out_scale.float().reshape(-1).contiguous(),
                 zo=self.out_zero.float().reshape(-1).contiguous(),
                 zq_g=per_g(zq, B, **i64), zk_g=per_g(zk, B, **i64), zv_g=per_g(zv, B, **i64),
                 m_g=per_g(m, B, **f64),
                 mult=torch.stack([per_g(sv * f, B, **f64) for f in plan['factors']]).contiguous())
        self._pow2_consts_cache = (key, c)
        return c

    # --- FQ-ViT fast path -------------------------------------------------------------------
    # The same integer algorithm as the generic path (int8 QKᵀ, dyadic logit requantization,
    # the integer LIS of ``softmax.int_log_softmax``, P·V as int8 GEMMs on −2^(top − code),
    # dyadic output requantization), fused per chunk of batch·head matrices so intermediates
    # stay in cache: the zero-point corrections enter the logit requantization as row / column
    # terms, and the LIS codes are looked up in a per-row table of d = max − x. Dyadic products
    # and sums are exact in float64 (``dyadic_values``), so this is the integer evaluation.
    def _lis_setup(self, n_tok: int, d: int, device):
        from .softmax import half_up_thresholds, lis_exp_table
        cfg = self.cfg
        bufs = (self.q_scale, self.q_zero, self.k_scale, self.k_zero, self.v_scale, self.v_zero,
                self.logit_scale, self.logit_zero)
        if cfg['out_range'] is None or any(t.numel() != 1 for t in bufs) \
                or self.out_scale.numel() != 1 or cfg['probs_bits'] > 15:
            return None
        bits, n_exp = cfg['probs_bits'], cfg['lis_n']
        from .kernels import args_key
        key = (n_tok, d, str(device)) + args_key(*bufs, self.out_scale, self.out_zero) + \
            (bits, n_exp, self.scale, self.method)
        if self._fast_cache is not None and self._fast_cache[0] == key:
            return self._fast_cache[1]
        lq_min, lq_max = cfg['logit_range']
        levels = lq_max - lq_min + 1
        hit = lis_exp_table(float(self.logit_scale), levels, n_exp, device)
        if hit is None or not hit[1] or int(hit[0].max()) * n_tok >= 2 ** 61:
            self._fast_cache = (key, None)
            return None
        oq_, ok_, ov_ = (int8_offset(*cfg[f'{r}_range']) for r in ('q', 'k', 'v'))
        zq, zk, zv = (int(round(float(z))) - o
                      for z, o in ((self.q_zero, oq_), (self.k_zero, ok_), (self.v_zero, ov_)))
        f64 = dict(dtype=torch.float64, device=device)
        m_logit = (torch.tensor(float(self.q_scale), **f64) * float(self.k_scale) * self.scale
                   / float(self.logit_scale))
        qk_bound = d * (128 + abs(zq)) * (128 + abs(zk))
        sim = self.method == 'simulation'
        if sim:
            mv, mo, exact = None, None, True
        else:
            (mv,), _, exact = dyadic_values([m_logit], qk_bound)
        K = 2 ** bits
        groups = -(-K // 8)
        frac = 8 * groups - 1
        pv_bound = n_tok * (2 ** frac) * (128 + abs(zv))
        if pv_bound >= 2 ** 62:
            # 6-bit codes and wider: the groups' shifted int64 sums would overflow; the generic
            # path (pow2_matmul per shift class) runs instead
            self._fast_cache = (key, None)
            return None
        m_out = torch.tensor(float(self.v_scale), **f64) * 2.0 ** -frac / float(self.out_scale)
        if not sim:
            (mo,), _, exact_out = dyadic_values([m_out], pv_bound)
        if not sim and not (exact and exact_out):
            self._fast_cache = (key, None)
            return None
        c = torch.tensor(half_up_thresholds(bits), dtype=torch.int64, device=device)
        table = hit[0]
        setup = dict(
            offsets=(oq_, ok_, ov_), zq=zq, zk=zk, zv=zv, mv=mv, mo=mo, frac=frac,
            tops=[8 * g + 7 for g in range(groups)], pv_int32=pv_bound < 2 ** 31,
            neg_table=-table, table=table, odd=c % 2, den=2 * c - 1, levels=levels,
            lo=float(lq_min - float(self.logit_zero)), hi=float(lq_max - float(self.logit_zero)),
            z_out=float(self.out_zero), out_range=tuple(cfg['out_range']), sim=sim,
            # 'simulation': the float32 logits / outputs of the integer-exact simulation
            m_sim=float(torch.tensor(float(self.q_scale), **f64) * float(self.k_scale) * self.scale),
            logit_scale=self.logit_scale.float(), out_step=2.0 ** -frac * float(self.v_scale),
            out_scale=self.out_scale.float())
        self._fast_cache = (key, setup)
        return setup

    @torch.no_grad()
    def _lis_fast(self, q, k, v):
        B, H, N, d = q.shape
        st = self._lis_setup(N, d, q.device)
        if st is None:
            return None
        dev = q.device
        oq_, ok_, ov_ = st['offsets']
        G = B * H
        qa = to_int8(q, oq_).reshape(G, N, d)
        ka = to_int8(k, ok_).reshape(G, N, d)
        va = to_int8(v, ov_).reshape(G, N, d)
        v_aug = torch.cat([va, torch.ones_like(va[..., :1])], dim=-1)
        zq, zk, zv = st['zq'], st['zk'], st['zv']
        mv = 1.0 if st['sim'] else float(st['mv'])
        # zero-point terms of Σ(a − z'_q)(b − z'_k), times the dyadic multiplier (exact in f64)
        sim = st['sim']
        row = (qa.sum(-1, dtype=torch.int64) * -zk + d * zq * zk).to(torch.float64)
        col = (ka.sum(-1, dtype=torch.int64) * -zq).to(torch.float64)
        if not sim:       # 'simulation' keeps the exact centred accumulator, scaled below
            row, col = row.mul_(mv), col.mul_(mv)
        row, col = row.unsqueeze(-1), col.unsqueeze(-2)
        cg = max(1, self.chunk_elems // (N * N)) if dev.type == 'cpu' else G
        levels, table, neg_table = st['levels'], st['table'], st['neg_table']
        lo, hi, frac = st['lo'], st['hi'], st['frac']
        width = levels + 1
        tops = st['tops']
        pv = torch.empty((len(tops), G, N, d + 1), dtype=torch.int32, device=dev)
        for i in range(0, G, cg):
            j = min(G, i + cg)
            n = j - i
            rows = n * N
            acc = int8_bmm(qa[i:j], ka[i:j].transpose(-2, -1))
            # logit code − z_logit = clamp(⌊acc·m + row + col⌉): exact dyadic arithmetic
            y = scratch('ia_y', (n, N, N), torch.float64, dev)
            torch.add(row[i:j], acc, alpha=mv, out=y)
            y.add_(col[i:j])
            if sim:     # ⌊float32(acc·Δ_q·Δ_k·scale) / Δ_logit⌉, the logit quantizer's rounding
                y.copy_(y.mul_(st['m_sim']).to(torch.float32).div_(st['logit_scale']))
            y.round_().clamp_(lo, hi)
            ymax = y.amax(-1, keepdim=True)
            dd = scratch('ia_d', (rows, N), torch.int32, dev)
            dd.copy_(torch.sub(ymax, y, out=y).view(rows, N))          # d = max − x
            e = scratch('ia_e', (rows, N), torch.int64, dev)
            torch.index_select(table, 0, dd.view(-1), out=e.view(-1))
            s2 = e.sum(-1, keepdim=True).mul_(2)
            theta = torch.div(s2 - st['odd'], st['den'], rounding_mode='floor')
            D = torch.searchsorted(neg_table, theta.neg_(), side='left')   # first d: T[d] ≤ θ_k
            lut = torch.zeros((rows, width), dtype=torch.uint8, device=dev)
            lut.scatter_add_(1, D, torch.ones(D.shape, dtype=torch.uint8, device=dev))
            lut = torch.cumsum(lut, 1, dtype=torch.uint8).view(-1)  # code(d) = #{k: D_k ≤ d}
            flat = dd.add_(torch.arange(0, rows * width, width, dtype=torch.int32,
                                        device=dev).unsqueeze(1)).view(-1)
            code = scratch('ia_code', (n, N, N), torch.uint8, dev)
            torch.index_select(lut, 0, flat, out=code.view(-1))
            code32 = code.to(torch.int32)
            for g, top in enumerate(tops):
                # operand −2^(top − code) for the codes of group g (0 ≤ top − code ≤ 7), else 0
                # (the byte of (2^top >> code) & 255; 2^top itself overflows from 5-bit codes)
                sh = torch.sub(top, code32)
                outside = (sh < 0) | (sh > 7)
                p = torch.bitwise_left_shift(torch.ones_like(sh), sh.clamp_(0, 7))
                p.masked_fill_(outside, 0)
                pv[g, i:j] = int8_bmm(p.neg_().to(torch.int8), v_aug[i:j])
        # Σ_j P_j (v'_j − z'_v) per group (P = −operand), groups aligned by shifts: exact
        # (int32 while |Σ| ≤ 2^frac·N·(128 + |z'_v|) < 2^31, else int64)
        acc_out = None
        for g, top in enumerate(tops):
            r = pv[g] if st['pv_int32'] else pv[g].to(torch.int64)
            s_g = torch.sub(r[..., d:] * zv, r[..., :d])
            if acc_out is None:
                acc_out = s_g.mul_(2 ** (frac - top)) if frac != top else s_g
            else:
                acc_out.add_(s_g, alpha=2 ** (frac - top))
        qmin_o, qmax_o = st['out_range']
        if sim:
            out = acc_out.to(torch.float64).mul_(st['out_step']).to(torch.float32)
            out = out.div_(st['out_scale']).round_().add_(st['z_out'])
        else:
            out = acc_out.to(torch.float64).mul_(st['mo']).round_().add_(st['z_out'])
        out = out.clamp_(qmin_o, qmax_o).to(torch.int32)
        return out.view(B, H, N, d).transpose(1, 2).reshape(B, N, H * d)
