"""Hessian-compensated weight quantization (GPTQ, Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers").

For a layer y = W x with W ∈ R^{R×K} and calibration inputs X = [x_1 … x_n] ∈ R^{K×n}, GPTQ
minimises ‖W X − Ŵ X‖²_F row by row. With H = 2 X Xᵀ (the Hessian of that error for one row), the
columns are quantized in order; after quantizing column i, the not-yet-quantized columns absorb the
error (Optimal Brain Quantization, GPTQ eq. 2–3):

    δ_i = (w_i − q(w_i)) / [H_F⁻¹]_ii,      w_F ← w_F − δ_i · [H_F⁻¹]_{i,F}

where F is the set of columns not yet quantized. GPTQ §4 ("Cholesky reformulation") shows that
row i of the upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U) holds exactly [H_F⁻¹]_{i,F} / √[H_F⁻¹]_ii,
so with U the update is δ_i = (w_i − q(w_i)) / U_ii, w_j ← w_j − δ_i U_ij (j > i). H is damped,
H + λ I with λ = percdamp · mean(diag H), before the inverse. Columns of H that are zero (an
input never non-zero during calibration) get H_ii = 1, which rounds them to nearest without
passing error on. Lazy batch updates (§4, "Lazy batch-updates") apply the update to the columns
beyond a block of ``block_size`` columns once per block; the result is the same up to float
rounding. ``act_order`` quantizes columns in order of decreasing H_ii (the "act-order" heuristic
of the GPTQ reference implementation).

The quantization grid is uniform per output channel (``ch_axis=0``) or per tensor, from the
range of the *original* weight (min/max, optionally shrunk per row by an MSE grid search as in
the GPTQ paper's reference runs), asymmetric or symmetric.

Life cycle in this plugin (see ``fqvit_det.nn.modules`` and the calibration runner):

* ``bind_weight(w)`` + ``finalize()`` before any data: plain round-to-nearest on that grid (a
  usable quantizer from the weights alone, what ``calibrate_weight`` produces);
* ``observe(x)`` with the layer's input rows during the runner's GPTQ pass: ``x`` is ``[N, K]``
  (a Linear's input rows) or ``[G, N, K]`` (a convolution's unfolded input, one slice per group;
  a depthwise convolution has one K = kh·kw Hessian per channel);
* ``finalize()`` after that pass: the Hessian-compensated codes.

Calibration statistics are the per-batch Hessian sums Σ x xᵀ and sample counts; the merge across
ranks interleaves them into global batch order and ``finalize`` sums them in that order, so the
merged statistics give bit-identical results to one process. Parameters (``get_params``):
``scale`` and ``zero_point`` ([R] or scalar) and ``codes`` (int32, the weight's shape): the
compensated integer weight, so a state file restores it without data. ``fake_quant(w)`` returns
(codes − z)·Δ, the compensated weight (the argument only supplies the dtype / shape check and,
under autograd, the straight-through path).
"""
import math
from typing import List, Optional

import torch

from .base import (MIN_SCALE, Quantizer, broadcast_param, check_bool, check_ch_axis, check_float,
                   check_int, needs_autograd)
from .registry import register_quantizer
from .stats import check_round_robin, interleave, to_cpu, to_device
from .uniform import integer_range, scale_zero_point


def hessian_columns(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``weight`` as GPTQ sees it: ``[G, R/G, K]`` (rows = output channels, columns = the inputs a
    row multiplies; a conv weight [O, I/G, kh, kw] flattens to K = I/G·kh·kw in ``F.unfold``'s
    (channel, kh, kw) order)."""
    rows = weight.shape[0]
    if rows % groups:
        raise ValueError(f'hessian_columns: {rows} output channels do not split into {groups} groups')
    return weight.reshape(groups, rows // groups, -1)


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes clamp(⌊w/Δ⌉ + z, q_min, q_max) (float dtype); Δ, z broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor,
                  zero_point: torch.Tensor, qmin: int, qmax: int, percdamp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, max_damp_tries: int = 6):
    """GPTQ of ``weight`` [G, R, K] against ``hessian`` [G, K, K] (both float64 recommended).

    ``scale`` / ``zero_point`` broadcast against [G, R, 1] (per row or one value). Returns
    (codes [G, R, K] as float, damping λ used per group [G]). Pure function of its inputs.
    """
    G, R, K = weight.shape
    W = weight.clone()
    H = hessian.clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0                      # unseen inputs: round to nearest, pass no error on
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)            # [G, K]
        W = torch.gather(W, 2, perm[:, None, :].expand(G, R, K))
        H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand(G, K, K)), 2,
                         perm[:, None, :].expand(G, K, K))
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    lam = percdamp * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)     # [G]
    for _ in range(max_damp_tries):
        L, info = torch.linalg.cholesky_ex(H + lam[:, None, None] * eye)
        if not bool((info != 0).any()):
            break
        lam = torch.where(info != 0, lam * 10, lam)   # not positive definite: damp harder
    else:
        raise ValueError(f'GPTQ: the damped Hessian is not positive definite even with λ = '
                         f'{lam.max().item():g}; increase percdamp')
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)   # H⁻¹ = Uᵀ U
    codes = torch.empty_like(W)
    for start in range(0, K, block_size):
        end = min(start + block_size, K)
        err_block = torch.empty(G, R, end - start, dtype=W.dtype, device=W.device)
        for i in range(start, end):
            w = W[:, :, i:i + 1]                                           # [G, R, 1]
            q = quantize_columns(w, scale, zero_point, qmin, qmax)
            codes[:, :, i:i + 1] = q
            err = (w - (q - zero_point) * scale) / U[:, i, i][:, None, None]
            # w_j ← w_j − δ_i U_ij for the rest of this block (eq. 3 with the Cholesky rows)
            W[:, :, i + 1:end] -= err * U[:, i:i + 1, i + 1:end]
            err_block[:, :, i - start:i - start + 1] = err
        if end < K:   # lazy batch update of the columns after the block (GPTQ §4)
            W[:, :, end:] -= err_block @ U[:, start:end, end:]
    if perm is not None:
        codes = torch.empty_like(codes).scatter_(2, perm[:, None, :].expand(G, R, K), codes)
    return codes, lam


def search_row_ranges(w: torch.Tensor, bits: int, symmetric: bool, grid: int = 100,
                      min_shrink: float = 0.2):
    """Per-row (min, max) of ``w`` [R, K] shrunk by the factor in {1, 1 − 1/grid, …, min_shrink}
    that minimises the row's round-to-nearest squared error (GPTQ's reference "mse" grid)."""
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    best_err = torch.full_like(lo, math.inf)
    best_lo, best_hi = lo.clone(), hi.clone()
    qmin, qmax = integer_range(bits, symmetric)
    steps = int(round((1 - min_shrink) * grid))
    for k in range(steps + 1):
        f = 1.0 - k / grid
        s, z = scale_zero_point(lo * f, hi * f, bits, symmetric, symmetric)
        q = quantize_columns(w, s[:, None], z[:, None], qmin, qmax)
        err = ((q - z[:, None]) * s[:, None] - w).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * f, best_lo)
        best_hi = torch.where(better, hi * f, best_hi)
    return best_lo, best_hi


INPUT_SOURCES = ('quant', 'float')


@register_quantizer()
class GPTQWeightQuantizer(Quantizer):
    """Hessian-compensated (GPTQ) weight quantizer for any weight role (see the module docstring).

    Args:
        bits: bit-width.
        ch_axis: ``0`` (per output channel, default) or ``None`` (per tensor).
        symmetric: symmetric signed grid (z = 0) instead of asymmetric unsigned.
        percdamp: damping λ = percdamp · mean(diag H), in (0, 1].
        block_size: columns per lazy batch update (≥ 1; the result does not depend on it beyond
            float rounding).
        act_order: quantize columns in order of decreasing H_ii.
        range_search: shrink each row's (or the tensor's) range by an MSE grid search first.
        inputs: which layer inputs the Hessian is built from (the runner's GPTQ pass):
            ``'quant'`` (default) — as the calibrated model sees them, activation quantizers and
            the other weight quantizers on (GPTQ layers keep float weights during the pass);
            ``'float'`` — the float model's inputs (every quantizer off).
    """

    PARAMS = ('scale', 'zero_point', 'codes')
    #: the modules feed this quantizer their input rows during the runner's GPTQ pass
    observes_layer_input = True

    def __init__(self, bits: int = 8, ch_axis: Optional[int] = 0, symmetric: bool = False,
                 percdamp: float = 0.01, block_size: int = 128, act_order: bool = False,
                 range_search: bool = False, inputs: str = 'quant'):
        super().__init__(bits)
        self.ch_axis = check_ch_axis(self, ch_axis)
        if self.ch_axis not in (None, 0):
            raise ValueError(f'GPTQWeightQuantizer: ch_axis must be 0 (per output channel) or None '
                             f'(per tensor), got {ch_axis!r}')
        self.symmetric = check_bool(self, 'symmetric', symmetric)
        self.percdamp = check_float(self, 'percdamp', percdamp, 0.0, 1.0, lo_open=True)
        self.block_size = check_int(self, 'block_size', block_size, 1)
        self.act_order = check_bool(self, 'act_order', act_order)
        self.range_search = check_bool(self, 'range_search', range_search)
        if inputs not in INPUT_SOURCES:
            raise ValueError(f'GPTQWeightQuantizer: inputs must be one of {INPUT_SOURCES}, got {inputs!r}')
        self.inputs = inputs
        self.qmin, self.qmax = integer_range(bits, self.symmetric)
        self.groups = 1
        self.register_buffer('scale', torch.ones(()))
        self.register_buffer('zero_point', torch.zeros(()))
        self.register_buffer('codes', torch.zeros((0,), dtype=torch.int32))
        self._weight = None
        self.last_damping = None   # λ per group of the last GPTQ finalize (diagnostics)
        self.reset_stats()

    # --- weight binding ---------------------------------------------------------------------
    def bind_weight(self, weight: torch.Tensor, groups: int = 1) -> None:
        """The weight ``finalize`` quantizes (the module's, detached; ``groups``: a grouped conv's
        group count, one Hessian per group)."""
        check_int(self, 'groups', groups, 1)
        if weight.shape[0] % groups:
            raise ValueError(f'{self.qname}: {weight.shape[0]} output channels do not split into '
                             f'{groups} groups')
        self._weight = weight.detach()
        self.groups = groups

    # --- calibration statistics -------------------------------------------------------------
    def reset_stats(self):
        self._hessians: List[torch.Tensor] = []   # per batch: Σ x xᵀ, [G, K, K] float32
        self._samples: List[int] = []
        self._num_batches = 0

    @property
    def num_observed(self) -> int:
        return self._num_batches

    def observe(self, x: torch.Tensor) -> None:
        """One batch of layer-input rows: ``[N, K]`` or ``[G, N, K]``."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[0] != self.groups:
            raise ValueError(f'{self.qname}: expected layer inputs [N, K] or [{self.groups}, N, K], '
                             f'got shape {tuple(x.shape)}')
        if self._hessians and x.shape[-1] != self._hessians[0].shape[-1]:
            raise ValueError(f'{self.qname}: input width changed between calibration batches '
                             f'({self._hessians[0].shape[-1]} vs {x.shape[-1]})')
        x = x.float()
        self._hessians.append(x.transpose(1, 2) @ x)
        self._samples.append(int(x.shape[1]))
        self._num_batches += 1

    def calibration_stats(self) -> dict:
        """``{'num_batches', 'hessians': [Σ x xᵀ per batch], 'samples': [rows per batch]}``
        (the Hessians are released by a GPTQ ``finalize``; the count stays)."""
        if self._num_batches != len(self._hessians):
            raise RuntimeError(f'{self.qname}: the Hessians were released by finalize(); '
                               'observe again after reset()')
        return {'num_batches': self._num_batches,
                'hessians': [to_cpu(h) for h in self._hessians], 'samples': list(self._samples)}

    def load_calibration_stats(self, stats: dict) -> None:
        self.reset_stats()
        self._hessians = [to_device(h, self.device) for h in stats['hessians']]
        self._samples = [int(n) for n in stats['samples']]
        self._num_batches = len(self._hessians)
        if len(self._hessians) != int(stats['num_batches']) or len(self._samples) != len(self._hessians):
            raise ValueError(f'{self.qname}: inconsistent calibration statistics '
                             f'(num_batches {stats["num_batches"]}, {len(self._hessians)} Hessians, '
                             f'{len(self._samples)} sample counts)')

    def merge_calibration_stats(self, per_rank) -> dict:
        total = check_round_robin([s['num_batches'] for s in per_rank], self.qname)
        return {'num_batches': total,
                'hessians': interleave([s['hessians'] for s in per_rank]),
                'samples': interleave([s['samples'] for s in per_rank])}

    def hessian(self) -> Optional[torch.Tensor]:
        """H = 2 Σ x xᵀ / n over the observed batches, summed in batch order (float64), or None."""
        if not self._hessians:
            return None
        total = torch.zeros(self._hessians[0].shape, dtype=torch.float64, device=self.device)
        for h in self._hessians:
            total += h.to(device=self.device, dtype=torch.float64)
        return total * (2.0 / max(1, sum(self._samples)))

    # --- finalize ---------------------------------------------------------------------------
    def _grid(self, w2d: torch.Tensor):
        """(Δ, z) per row of ``w2d`` [R, K] (or one pair) from the original weight's range."""
        if self.ch_axis is None:
            flat = w2d.reshape(1, -1)
        else:
            flat = w2d
        if self.range_search:
            lo, hi = search_row_ranges(flat, self.bits, self.symmetric)
        else:
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        scale, zp = scale_zero_point(lo, hi, self.bits, self.symmetric, self.symmetric)
        if self.ch_axis is None:
            return scale.reshape(()), zp.reshape(())
        return scale, zp

    def finalize(self) -> None:
        """Round to nearest without observed inputs; GPTQ with them (then releases the
        Hessians; ``num_observed`` stays until ``reset()``)."""
        if self._weight is None:
            raise RuntimeError(f'{self.qname}: no weight bound (the module binds its weight in '
                               'calibrate_weight)')
        if self._num_batches and not self._hessians:
            raise RuntimeError(f'{self.qname}: finalize() already used (and released) the observed '
                               'Hessians; reset() and observe again')
        w = self._weight.to(device=self.device)
        w2d = w.reshape(w.shape[0], -1).double()
        scale, zp = self._grid(w2d)
        s_rows = scale.reshape(-1, 1) if scale.dim() else scale
        z_rows = zp.reshape(-1, 1) if zp.dim() else zp
        H = self.hessian()
        if H is None:
            codes = quantize_columns(w2d, s_rows, z_rows, self.qmin, self.qmax)
            self.last_damping = None
        else:
            G = self.groups
            Wg = hessian_columns(w2d, G)
            if H.shape != (G, Wg.shape[2], Wg.shape[2]):
                raise ValueError(f'{self.qname}: Hessian of shape {tuple(H.shape)} does not match '
                                 f'the weight ({G} groups of {Wg.shape[2]} columns)')
            sg = s_rows.reshape(G, -1, 1) if scale.dim() else s_rows
            zg = z_rows.reshape(G, -1, 1) if zp.dim() else z_rows
            codes, lam = gptq_quantize(Wg, H, sg, zg, self.qmin, self.qmax, self.percdamp,
                                       self.block_size, self.act_order)
            self.last_damping = lam.cpu()
            self._hessians, self._samples = [], []   # large; the codes are the result
        self.set_params(scale=scale.float(), zero_point=zp.float(),
                        codes=codes.reshape(w.shape).to(torch.int32))

    def set_params(self, scale=None, zero_point=None, codes=None):
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=torch.float32).detach().clamp(min=MIN_SCALE)
        params = {'scale': scale, 'zero_point': zero_point}
        if codes is not None:   # int32 whatever the source dtype (a state file keeps int32)
            self._buffers['codes'] = torch.as_tensor(codes).detach().to(
                device=self.device, dtype=torch.int32).clone()
        self._assign_params(params)

    # --- quantization -----------------------------------------------------------------------
    def _check_shape(self, x: torch.Tensor) -> None:
        if tuple(x.shape) != tuple(self.codes.shape):
            raise ValueError(f'{self.qname}: GPTQ codes were computed for a weight of shape '
                             f'{tuple(self.codes.shape)}, got {tuple(x.shape)} (recalibrate after '
                             'changing the weight)')

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The compensated codes of the bound weight (``x`` must be that weight)."""
        self._check_shape(x)
        return self.codes.clone()

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        s = broadcast_param(self.scale, codes, self.ch_axis)
        z = broadcast_param(self.zero_point, codes, self.ch_axis)
        return (codes.to(s.dtype) - z) * s

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The compensated weight (codes − z)·Δ; straight-through gradient to ``x``."""
        self._check_shape(x)
        wq = self.dequantize(self.codes).to(x.dtype)
        if needs_autograd(x):
            return x + (wq - x).detach()
        return wq

    def extra_repr(self):
        gran = 'per-tensor' if self.ch_axis is None else 'ch_axis=0'
        return (f'bits={self.bits}, symmetric={self.symmetric}, {gran}, percdamp={self.percdamp}, '
                f'block_size={self.block_size}, act_order={self.act_order}, '
                f'range_search={self.range_search}, inputs={self.inputs}, groups={self.groups}, mode={self.mode}')
