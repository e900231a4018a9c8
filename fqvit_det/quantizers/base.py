"""Quantizer base class: the contract every quantizer family implements.

Life cycle (driven by the calibration runner through ``set_mode``):

* ``'float'``   – identity; the module behaves like the float model.
* ``'observe'`` – calibration: ``observe(x)`` collects statistics, the input passes through unchanged.
* ``'quant'``   – simulated quantization: ``fake_quant(x) == dequantize(quantize(x))``.

``finalize()`` turns the collected statistics into parameters. Every calibrated parameter is a
buffer, so ``state_dict()`` holds the whole calibrated state (safetensors-friendly: plain tensors).
Buffers may change shape at ``finalize`` or ``load_state_dict`` (e.g. per-channel scales), which
``_load_from_state_dict`` below allows.
"""
import functools
import math
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

MODES = ('float', 'observe', 'quant')
# Smallest scale any quantizer may use: a zero range (constant or all-zero tensor) falls back to it.
MIN_SCALE = float(torch.finfo(torch.float32).eps)


# Simulated-quantization kernels (``fake_quant_uniform``, ``LogIntSoftmax``, integer LayerNorm)
# process large tensors in row chunks of about this many elements: the chains of elementwise ops
# then stay in the CPU cache instead of streaming every intermediate through memory (an order of
# magnitude faster on CPU). Results are per element / per row, so chunking never changes them.
CHUNK_ELEMS = 1 << 17


def chunk_step(row_elems: int, target: Optional[int] = None, device=None) -> int:
    """Rows per chunk for rows of ``row_elems`` elements (at least one). Off the CPU (where one
    large kernel beats many small ones) a single chunk of up to 2^62 elements."""
    if device is not None and torch.device(device).type != 'cpu':
        target = 1 << 62
    return max(1, (target or CHUNK_ELEMS) // max(1, row_elems))


def flat_chunks(x: torch.Tensor, out: torch.Tensor):
    """(input chunk, output chunk) pairs covering contiguous ``x`` and ``out`` element by element,
    for kernels whose result is per element."""
    xv, ov = x.view(-1), out.view(-1)
    step = chunk_step(1, device=x.device)
    for i in range(0, xv.shape[0], step):
        yield xv[i:i + step], ov[i:i + step]


# Intra-op threads for the chunked kernels (``None``: the caller's ``torch.get_num_threads()``).
# ``benchmarks/cls_speed.py`` on an idle 2-core machine: DeiT-Tiny FQ-ViT 8/8/4 quantized forward
# 1.41x float with None vs 1.82x with 1; set 1 on a machine shared with other jobs (see below).
CHUNK_THREADS: Optional[int] = None


def single_threaded(fn):
    """Run ``fn`` with ``CHUNK_THREADS`` intra-op threads (restored afterwards).

    The chunked kernels issue many small ops; letting each of them fork and join the OpenMP pool
    costs more than it saves, and on a loaded machine every join can wait for a descheduled
    worker (measured with 2 threads on 2 busy cores: a DeiT-Tiny forward 3× slower than with the
    kernels single-threaded). The large ops around them (matmuls) keep the caller's thread count.
    On an idle machine ``CHUNK_THREADS = None`` (the default) is faster; results are identical.
    Off the CPU (the first tensor argument decides) the thread count is left alone.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        k = CHUNK_THREADS
        if k is None or not _on_cpu(args, kwargs):
            return fn(*args, **kwargs)
        n = torch.get_num_threads()
        if k == n:
            return fn(*args, **kwargs)
        torch.set_num_threads(k)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return wrapper


def _on_cpu(args, kwargs) -> bool:
    """False when a tensor argument lives off the CPU (the thread count is a CPU setting)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type == 'cpu'
        if isinstance(a, nn.Module):
            t = next(iter(a.buffers()), None)
            if t is not None:
                return t.device.type == 'cpu'
    return True


class _Workspace(threading.local):
    def __init__(self):
        self.buffers = {}


_WORKSPACE = _Workspace()


def scratch(name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A reusable per-thread scratch tensor (uninitialised) for chunk intermediates.

    Fresh large CPU allocations are page-faulted on first touch, which costs as much as the
    arithmetic in these op chains; reusing one buffer per name avoids that. A buffer is only
    valid until the next ``scratch`` call with the same name (callers use distinct names).
    """
    if torch.device(device).type != 'cpu':   # one whole-tensor chunk; the caching allocator
        return torch.empty(shape, dtype=dtype, device=device)   # reuses memory by itself
    n = int(math.prod(shape))
    key = (name, dtype, str(device))
    buf = _WORKSPACE.buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=dtype, device=device)
        _WORKSPACE.buffers[key] = buf
    return buf[:n].view(shape)


def needs_autograd(*tensors) -> bool:
    """True when a fake-quant must keep its straight-through-estimator graph."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in tensors)


def is_integral(t: torch.Tensor) -> bool:
    """Every entry is a finite integer value (e.g. a zero point stored as float)."""
    return bool(torch.isfinite(t).all()) and bool((t == torch.round(t)).all())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (so gradients can flow through fake-quant)."""
    return x + (torch.round(x) - x).detach()


def reduce_dims(x: torch.Tensor, ch_axis: Optional[int]):
    """Dimensions to reduce over for per-tensor (``ch_axis=None``) or per-channel statistics."""
    if ch_axis is None:
        return tuple(range(x.dim()))
    axis = ch_axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def broadcast_param(p: torch.Tensor, x: torch.Tensor, ch_axis: Optional[int]) -> torch.Tensor:
    """Reshape a per-channel parameter (shape ``[C]``) so it broadcasts against ``x`` on ``ch_axis``."""
    if ch_axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[ch_axis % x.dim()] = -1
    return p.reshape(shape)


def check_finite(x: torch.Tensor, who: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f'{who}: calibration batch contains {bad} NaN/Inf values; '
                         'quantization parameters cannot be computed from non-finite activations')


def resize_buffers_for_load(module: nn.Module, state_dict, prefix: str) -> None:
    """Resize ``module``'s own buffers to the shapes stored in ``state_dict`` before loading.

    Calibrated buffers may have a shape only known after calibration (per-channel, per-head), so a
    freshly built module (scalar defaults) must accept them. Used by quantizers and observers.
    """
    for name, buf in list(module._buffers.items()):
        key = prefix + name
        if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
            module._buffers[name] = torch.empty(state_dict[key].shape, dtype=buf.dtype,
                                                device=buf.device)



# --- constructor argument checks (errors name the argument) ----------------------------------
def _who(owner) -> str:
    return owner if isinstance(owner, str) else type(owner).__name__


def check_int(owner, name: str, value, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` must be an int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{_who(owner)}: {name} must be an int, got {value!r} '
                        f'({type(value).__name__})')
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f'[{lo}, {hi}]' if hi is not None else f'>= {lo}'
        raise ValueError(f'{_who(owner)}: {name} must be in {rng}, got {value!r}')
    return value


def check_bool(owner, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f'{_who(owner)}: {name} must be a bool (True/False), got {value!r} '
                        f'({type(value).__name__})')
    return value


def check_percentiles(owner, percentiles) -> tuple:
    """A non-empty sequence of upper-tail probabilities in (0.5, 1) (RepQ-ViT's percentile search)."""
    if isinstance(percentiles, (str, bytes)) or not isinstance(percentiles, Sequence) or not percentiles:
        raise TypeError(f'{_who(owner)}: percentiles must be a non-empty sequence of numbers in '
                        f'(0.5, 1), got {percentiles!r}')
    return tuple(check_float(owner, 'percentiles', p, 0.5, 1.0, True, True) for p in percentiles)


def check_float(owner, name: str, value, lo: float = None, hi: float = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` must be a real number (int or float, not a bool) in the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f'{_who(owner)}: {name} must be a finite number, got {value!r} '
                        f'({type(value).__name__})')
    bad = ((lo is not None and (value <= lo if lo_open else value < lo))
           or (hi is not None and (value >= hi if hi_open else value > hi)))
    if bad:
        rng = (('(' if lo_open else '[') + ('-inf' if lo is None else f'{lo:g}') + ', '
               + ('inf' if hi is None else f'{hi:g}') + (')' if hi_open else ']'))
        raise ValueError(f'{_who(owner)}: {name} must be in {rng}, got {value!r}')
    return float(value)


def check_ch_axis(owner, value, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        expected = 'None or an int' if allow_none else 'an int'
        raise TypeError(f'{_who(owner)}: ch_axis must be {expected} (a tensor axis), got {value!r} '
                        f'({type(value).__name__})')
    return value


class Quantizer(nn.Module):
    """Base class of every quantizer family.

    Subclasses implement ``observe``, ``finalize``, ``quantize``, ``dequantize`` and the
    calibration-statistics interface below; ``PARAMS`` names the buffers ``get_params`` returns.

    Calibration statistics (what ``observe`` collects and ``finalize`` consumes) are kept in plain
    attributes, never in the ``state_dict``: a state file holds parameters only. The statistics
    interface lets a data-parallel runner make every rank finalize exactly as one process would:

    * ``num_observed`` – calibration batches observed since ``reset()``;
    * ``calibration_stats()`` – everything ``finalize()`` needs, as plain picklable values;
    * ``merge_calibration_stats(per_rank)`` – the statistics of ranks 0 … W − 1 (rank r observed
      the global batches r, r + W, r + 2W, …) → exactly the statistics of one process that
      observed all batches in global order;
    * ``load_calibration_stats(stats)`` – replace the observed statistics with ``stats``.

    ``finalize()`` may release large statistics (sample pools, a kept last batch) to free memory;
    ``num_observed`` stays until ``reset()``.
    """

    #: names of the calibrated parameter buffers (``get_params`` / ``set_params``)
    PARAMS: Tuple[str, ...] = ()

    def __init__(self, bits: int = 8):
        super().__init__()
        check_int(self, 'bits', bits, 2, 16)
        self.bits = bits
        self.mode = 'float'
        # Name used in error messages; the model converter sets it to the module path.
        self.qname = type(self).__name__
        self.register_buffer('calibrated', torch.tensor(False))

    # --- life cycle -------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f'{self.qname}: mode must be one of {MODES}, got {mode!r}')
        if mode == 'quant' and not bool(self.calibrated):
            raise RuntimeError(f'{self.qname}: cannot quantize before calibration (call finalize() '
                               'after observing data, or load a calibrated state)')
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == 'float':
            return x
        if self.mode == 'observe':
            with torch.no_grad():
                check_finite(x, self.qname)
                self.observe(x.detach())
            return x
        return self.fake_quant(x)

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        """Compute parameters from observed statistics; must set ``self.calibrated``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget observed statistics (e.g. before re-calibrating weights changed by a
        reparameterization); parameters keep their values until the next ``finalize``."""
        self.reset_stats()
        self.calibrated.fill_(False)

    def reset_stats(self) -> None:
        raise NotImplementedError

    def mark_calibrated(self) -> None:
        self.calibrated.fill_(True)

    @property
    def device(self) -> torch.device:
        return self.calibrated.device

    # --- calibration statistics ---------------------------------------------------------------
    @property
    def num_observed(self) -> int:
        """Calibration batches observed since ``reset()``."""
        raise NotImplementedError

    def calibration_stats(self) -> dict:
        """Everything ``finalize()`` needs, as plain values (CPU tensors, lists, ints, None)."""
        raise NotImplementedError

    def load_calibration_stats(self, stats: dict) -> None:
        """Replace the observed statistics with ``stats`` (from ``calibration_stats`` or
        ``merge_calibration_stats``); tensors move to this quantizer's device."""
        raise NotImplementedError

    def merge_calibration_stats(self, per_rank: Sequence[dict]) -> dict:
        """The statistics of one process that observed, in global order, every batch the ranks
        observed (``per_rank[r]`` from rank r, which observed global batches r, r + W, …).
        Exact for every family; does not change ``self``."""
        raise NotImplementedError

    # --- parameters ---------------------------------------------------------------------------
    def get_params(self) -> Dict[str, torch.Tensor]:
        """The calibrated parameters fake-quant uses (copies), keyed by ``PARAMS``."""
        return {name: getattr(self, name).detach().clone() for name in self.PARAMS}

    def set_params(self, **params) -> None:
        """Set any subset of ``PARAMS`` (shapes may change, e.g. per-channel); values move to this
        quantizer's device and keep the buffer's dtype. Marks the quantizer calibrated."""
        self._assign_params(params)

    def _assign_params(self, params: dict) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise ValueError(f'{self.qname}: unknown parameter(s) {unknown}; expected a subset of '
                             f'{list(self.PARAMS)}')
        for name, value in params.items():
            if value is None:
                continue
            old = getattr(self, name)
            if isinstance(value, torch.Tensor):
                value = value.detach()
            self._buffers[name] = torch.as_tensor(value).to(device=old.device,
                                                            dtype=old.dtype).clone()
        self.params_changed()
        self.mark_calibrated()

    def params_changed(self) -> None:
        """Hook: drop caches derived from the parameters."""

    # --- quantization -----------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (an integer dtype tensor)."""
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x)).to(x.dtype)

    # --- state ------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        resize_buffers_for_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.params_changed()

    def extra_repr(self) -> str:
        return f'bits={self.bits}, mode={self.mode}'
