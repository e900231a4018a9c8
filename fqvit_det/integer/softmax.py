"""FQ-ViT Log-Int-Softmax as an integer kernel on logit codes (bit-exact with
``fqvit_det.quantizers.lis.LogIntSoftmax``), and P·V on its log2 codes.

``int_log_softmax(logit_codes, scale, bits, n, qmin, qmax)``: b_l-bit logit codes → b-bit log2
codes (``ZERO_CODE`` = −1 for probabilities that round to 0). Everything is integer:

1. d = row max − code ∈ [0, 2^b_l − 1] (the zero point cancels);
2. i-exp table (``int_exp_parts``, the official constants): T[d] = z(d)·2^(Q − q(d)), int64,
   with Q the largest q of the table — the row's exps up to a common power of two, so the ratios
   R_i = ⌊Σ_j T_j / T_i⌉ (ties to even) are those of ``LogIntSoftmax.exp_ratios``;
3. code_i = round-half-up(log2 R_i) = #{k ≥ 1 : R_i ≥ c_k}, c_1 = 2, c_k = 3·2^(k−2) (the
   thresholds of the half-up rule), and R_i ≥ c ⟺ (2c − 1)·T_i < 2Σ, or = with c even (ties to
   even) ⟺ T_i ≤ θ_k = ⌊(2Σ − [c_k odd]) / (2c_k − 1)⌋. So a row needs 2^b integer divisions
   (θ_k), not one per entry; since T is non-increasing in d (checked when the table is built),
   T_i ≤ θ_k ⟺ d_i ≥ D_k = min{d : T[d] ≤ θ_k}, and code_i = #{k : D_k ≤ d_i}, a search among
   2^b sorted integers. Codes ≥ 2^b (and T_i = 0) → ``ZERO_CODE``.

Where the table could overflow (T_max·N ≥ 2^61, e.g. 16-bit logits over a wide range, where the
simulation itself shifts its exps) or T is not monotone, the kernel runs the simulation's literal
row-relative int64 algorithm on the codes instead (``lis_codes_reference``). Either way bit-exact.

``lis_pv(codes, v_codes, v_zero, v_range)``: Σ_j 2^−code_j·(v_j − z_v) as an exact int64
accumulator in units of 2^−frac_bits (int8 GEMMs on −2^(7−k) operands, see
``attention.pow2_matmul``); no float anywhere.
"""
from typing import Tuple

import torch

from ..quantizers.lis import (EXP_N, int_exp_parts, int_ratio_round, log2_round_half_up)
from ..quantizers.log import ZERO_CODE
from .attention import log2_tables, pow2_matmul


def half_up_thresholds(bits: int, cap: int = 2 ** 61):
    """c_k, k = 1 … 2^b: round-half-up(log2 R) ≥ k ⟺ R ≥ c_k (R ≥ 1 integer). Values above
    ``cap`` are replaced by ``cap`` (ratios R ≤ Σ < 2^61 never reach them), so 2c − 1 fits int64."""
    return [min(c, cap) for c in [2] + [3 * 2 ** (k - 2) for k in range(2, 2 ** bits + 1)]]


def lis_exp_table(scale: float, levels: int, n: int = EXP_N, device=None):
    """T[d] = z(d)·2^(Q − q(d)) for d = 0 … levels − 1 (int64), or ``None`` if T·2^… would not fit
    int64. Returns (T, monotone) where monotone says T is non-increasing in d."""
    d = torch.arange(levels, dtype=torch.int64)
    z, q, _ = int_exp_parts(-d, float(scale), n)
    q_top = int(q.max())
    if int(z.max()).bit_length() + q_top > 62:
        return None
    t = torch.bitwise_left_shift(z, q_top - q)
    monotone = bool((t[1:] <= t[:-1]).all())
    return t.to(device), monotone


_TABLE_CACHE = {}


def _table(scale: float, levels: int, n: int, device):
    key = (float(scale), levels, n, str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        if len(_TABLE_CACHE) > 256:
            _TABLE_CACHE.clear()
        hit = _TABLE_CACHE[key] = lis_exp_table(scale, levels, n, device)
    return hit


def lis_codes_reference(logit_codes: torch.Tensor, scale: float, bits: int = 4,
                        n: int = EXP_N) -> torch.Tensor:
    """The simulation's literal int64 algorithm (``LogIntSoftmax.exp_ratios`` +
    ``quantize_exact``) on logit codes; int8 log2 codes with ``ZERO_CODE``."""
    x = logit_codes.to(torch.int64)
    x = x - x.amax(dim=-1, keepdim=True)
    z, q, _ = int_exp_parts(x, float(scale), n)
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
    code = log2_round_half_up(torch.where(pos, ratio, torch.ones_like(ratio)))
    zero = (~pos) | (code >= 2 ** bits)
    return torch.where(zero, torch.full_like(code, ZERO_CODE), code).to(torch.int8)


def int_log_softmax(logit_codes: torch.Tensor, scale: float, bits: int = 4, n: int = EXP_N,
                    qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """FQ-ViT Log-Int-Softmax on integer logit codes in [q_min, q_max] (last dim = keys) with
    logit scale ``scale``; int8 log2 codes, ``ZERO_CODE`` (−1) for zero. Bit-exact with
    ``LogIntSoftmax.quantize`` of logits whose codes these are."""
    if logit_codes.is_floating_point():
        raise TypeError('int_log_softmax: integer logit codes expected (use the logit quantizer\'s '
                        'quantize)')
    if not 1 <= bits <= 7:
        raise ValueError(f'int_log_softmax: bits must lie in [1, 7] for int8 codes, got {bits}')
    shape = logit_codes.shape
    n_tok = shape[-1]
    if logit_codes.numel() == 0:
        return torch.empty(shape, dtype=torch.int8, device=logit_codes.device)
    dev = logit_codes.device
    levels = qmax - qmin + 1
    hit = _table(scale, levels, n, dev)
    if hit is None or not hit[1] or int(hit[0].max()) * n_tok >= 2 ** 61:
        return lis_codes_reference(logit_codes, scale, bits, n)
    table = hit[0]
    x = logit_codes.reshape(-1, n_tok)
    x = x.to(torch.int32) if x.dtype not in (torch.int32, torch.int64) else x
    d = (x.amax(dim=-1, keepdim=True) - x).to(torch.int64)          # [0, levels − 1]
    e = table.index_select(0, d.view(-1)).view(d.shape)
    total2 = 2 * e.sum(dim=-1, keepdim=True)                         # 2Σ, < 2^62
    c = torch.tensor(half_up_thresholds(bits), dtype=torch.int64, device=dev)
    theta = torch.div(total2 - (c % 2), 2 * c - 1, rounding_mode='floor')   # (rows, 2^b)
    # D_k = first d with T[d] ≤ θ_k (−T is non-decreasing)
    D = torch.searchsorted(-table, -theta, side='left')              # (rows, 2^b), non-decreasing
    code = torch.searchsorted(D, d, right=True)                       # #{k : D_k ≤ d}
    code = torch.where(code >= 2 ** bits, torch.full_like(code, ZERO_CODE), code)
    return code.to(torch.int8).view(shape)


def lis_pv(codes: torch.Tensor, v_codes: torch.Tensor, v_zero, v_range: Tuple[int, int],
           bits: int = None):
    """P·V for log2 codes (x̂ = 2^−code, codes < 2^bits): ``(acc, frac_bits)`` with
    Σ_j 2^−code_j (v_j − z_v) = acc·2^−frac_bits exactly (int64)."""
    if bits is None:
        bits = max(int(codes.max()) if codes.numel() else 0, 0).bit_length()
    mant, shift = log2_tables(bits)
    return pow2_matmul(codes.to(torch.int32) + 1, mant, shift, v_codes, v_zero, v_range)
