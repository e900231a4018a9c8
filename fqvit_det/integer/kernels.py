"""Compiled CPU kernels of the integer model (``csrc/int8_kernels.cpp``) and its replay program
(``csrc/replay.cpp``, used by ``recording.py``), built on first use.

``torch.utils.cpp_extension.load`` compiles the file once per machine and torch build (cached in
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; about a minute on 2 cores) and
registers ``torch.ops.fqvit_int``. It needs a C++ compiler and ``ninja`` (in the pinned stack).

Which kernels run is chosen by ``set_backend`` or the ``FQVIT_INT_KERNELS`` environment variable:

* ``'auto'`` (default): the compiled kernels where they build; where they do not, one warning
  naming the reason and the torch-op path (same results, slower);
* ``'cpp'``: the compiled kernels or an error;
* ``'torch'``: torch ops only (``torch._int_mm`` per matrix).

Both paths compute the same exact integers (tests compare them bit for bit).

With the compiled kernels, the int8 GEMMs run on Intel AMX tiles where the CPU has AMX-INT8 and
Linux grants the tile state (``csrc/amx_gemm.cpp``; the Linear layers' weights are packed once,
the attention cores' kᵀ and values once per matrix), else through ``torch._int_mm``: the same
int32 results. ``set_amx(False)`` or ``FQVIT_INT_AMX=0``
switches AMX off.
"""
import os
import os.path as osp
import platform
import threading
import warnings
from typing import Optional

import torch

from ..log import get_logger

BACKENDS = ('auto', 'cpp', 'torch')
_SOURCES = [osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', f)
            for f in ('int8_kernels.cpp', 'amx_gemm.cpp', 'replay.cpp')]
_lock = threading.Lock()
_state = dict(backend=None, ops=None, error=None, tried=False, amx=False)


def _backend() -> str:
    if _state['backend'] is None:
        b = os.environ.get('FQVIT_INT_KERNELS', 'auto')
        if b not in BACKENDS:
            raise ValueError(f'FQVIT_INT_KERNELS={b!r}: expected one of {BACKENDS}')
        _state['backend'] = b
    return _state['backend']


def set_backend(backend: str) -> None:
    """'auto' | 'cpp' | 'torch' (see the module docstring); 'cpp' builds now or raises."""
    if backend not in BACKENDS:
        raise ValueError(f'set_backend: expected one of {BACKENDS}, got {backend!r}')
    _state['backend'] = backend
    if backend == 'cpp':
        _load()


def _build():
    from torch.utils import cpp_extension
    try:                     # the pip ninja's binary, where the venv's bin is not on PATH
        import ninja
        if ninja.BIN_DIR not in os.environ.get('PATH', '').split(os.pathsep):
            os.environ['PATH'] = ninja.BIN_DIR + os.pathsep + os.environ.get('PATH', '')
    except ImportError:
        pass
    # no fused multiply-add, no reassociation: each float step is the IEEE operation of the torch
    # path; -fno-trapping-math only lets loops with selects vectorize (no FP traps are used)
    flags = ['-O3', '-ffp-contract=off', '-fno-trapping-math', '-fopenmp']
    if platform.machine() in ('x86_64', 'AMD64'):
        flags.append('-march=x86-64-v2')   # SSE4.1 rounding inline; every x86-64 CPU since 2009
    cpp_extension.load(name='fqvit_int_kernels', sources=_SOURCES, extra_cflags=flags,
                       extra_ldflags=['-fopenmp'],
                       is_python_module=False, verbose=False)
    return torch.ops.fqvit_int


def _load():
    with _lock:
        if not _state['tried']:
            want_amx = _amx_env()
            _state['tried'] = True
            try:
                ops = _build()
                _state['amx'] = want_amx and bool(ops.amx_available())
                _state['ops'] = ops
                get_logger().info('fqvit_det.integer: compiled CPU kernels loaded; int8 GEMMs '
                                  + ('on AMX tiles' if _state['amx'] else 'through torch._int_mm'))
            except Exception as e:  # noqa: BLE001 -- reported below, with the reason
                _state['error'] = f'{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}'
                if _backend() == 'auto':
                    warnings.warn('fqvit_det.integer: the compiled CPU kernels did not build '
                                  f'({_state["error"]}); using torch ops (same results, slower). '
                                  'Set FQVIT_INT_KERNELS=torch to skip the build.', RuntimeWarning)
    if _state['ops'] is None and _backend() == 'cpp':
        raise RuntimeError(f'fqvit_det.integer: compiled kernels requested but unavailable: '
                           f'{_state["error"]}')
    return _state['ops']


def native() -> Optional[object]:
    """``torch.ops.fqvit_int`` when the backend allows it and the kernels build, else None."""
    if _backend() == 'torch':
        return None
    return _load()


def info() -> dict:
    """What runs: the backend, whether the compiled kernels loaded, a build error if any, and
    whether the int8 GEMMs run on AMX tiles."""
    ops = native()
    return dict(backend=_backend(), compiled=ops is not None, error=_state['error'],
                amx=amx_ops() is not None)


def _amx_env() -> bool:
    env = os.environ.get('FQVIT_INT_AMX', '1')
    if env not in ('0', '1'):
        raise ValueError(f'FQVIT_INT_AMX={env!r}: expected 0 or 1')
    return env == '1'


def set_amx(enabled: bool) -> bool:
    """Run the int8 GEMMs on AMX tiles where available (default; ``FQVIT_INT_AMX=0`` starts
    with them off) or always through ``torch._int_mm``. Returns whether AMX is on now."""
    _state['amx'] = bool(enabled) and amx_available()
    return _state['amx']


def amx_available() -> bool:
    """Whether this CPU has AMX-INT8 and the OS granted the tile state (whatever the setting)."""
    ops = native()
    return ops is not None and bool(ops.amx_available())


def amx_ops() -> Optional[object]:
    """``torch.ops.fqvit_int`` when the int8 GEMMs run on AMX tiles, else None."""
    ops = native()
    return ops if ops is not None and _state['amx'] else None


def args_key(*tensors) -> tuple:
    """A cache key for kernel arguments prepared from ``tensors``: each tensor's identity and
    in-place version counter (None entries allowed), so a reload or an edit of any of them
    invalidates the cache without reading their values."""
    return tuple(None if t is None else (id(t), t._version) for t in tensors)
