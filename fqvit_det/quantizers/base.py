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
from typing import Optional

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
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = torch.get_num_threads()
        k = CHUNK_THREADS
        if k is None or k == n:
            return fn(*args, **kwargs)
        torch.set_num_threads(k)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return wrapper


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


class Quantizer(nn.Module):
    """Base class. Subclasses implement ``observe``, ``finalize``, ``quantize``, ``dequantize``."""

    def __init__(self, bits: int = 8):
        super().__init__()
        if not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f'{type(self).__name__}: bits must be an int in [2, 16], got {bits!r}')
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
        """Forget observed statistics (e.g. before re-calibrating weights changed by a reparameterization)."""
        for mod in self.modules():
            if mod is not self and hasattr(mod, 'reset_stats'):
                mod.reset_stats()
        self.calibrated.fill_(False)

    def mark_calibrated(self) -> None:
        self.calibrated.fill_(True)

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

    def extra_repr(self) -> str:
        return f'bits={self.bits}, mode={self.mode}'
