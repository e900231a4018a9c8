"""Replay of an integer model's forward from C++: the same ops without the Python between them.

At batch 1 an eager forward of the integer DeiT-Tiny spends about as long in Python (module
calls, argument preparation, dispatch) as in its kernels. For a given input shape the sequence of
ops and their arguments does not change from call to call, so ``replay(model)`` records it once
(a ``TorchDispatchMode`` sees every dispatcher call) and afterwards runs the recorded calls from
C++ (``csrc/replay.cpp``): the same kernels with the same arguments, hence bit-identical outputs.

What the recording keeps and drops:

* a tensor that no recorded op produced (a weight, a buffer, a cached table) is a constant of the
  program, held by reference; an op whose tensor inputs are all constants is computed once at
  recording (its outputs become constants), unless it writes into a tensor;
* an op that returns one of its inputs unchanged (dropout in eval, a no-op ``to`` or
  ``contiguous``) is dropped;
* a value the Python code read from a tensor computed from the input (``item``, ``is_nonzero``,
  ...) is a guard: where replay gets a different value, it stops and the eager forward runs
  (counted in ``stats['fallbacks']``);
* a program that would write into a constant is not kept (eager forward, with the reason in
  ``stats['declined']``).

A program is keyed by the inputs' shapes, strides and dtypes. The first call with a key runs
eagerly (it fills the modules' caches), the second records, later ones replay. Replay runs only
on CPU tensors with gradients off and needs the compiled kernels (``kernels.native()``);
elsewhere the wrapper calls the module. After changing the wrapped model (loading weights,
switching options) call ``reset()``.
"""
import weakref
from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from . import kernels

__all__ = ['ReplayedModule', 'replay', 'NotReplayable']

# c10::ScalarType / MemoryFormat / Layout enum values (IValue holds them as ints)
_DTYPES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4,
           torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bool: 11,
           torch.bfloat16: 15}
_MEMORY_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1,
                   torch.channels_last: 2, torch.channels_last_3d: 3}
_VALUE, _SLOT, _SLOT_LIST, _OPT_SLOT_LIST = 0, 1, 2, 3


class _Step(NamedTuple):
    name: str                     # operator, e.g. 'aten::add'
    overload: str
    args: tuple                   # (kind, payload) per schema argument
    outs: List[int]               # slot of each returned tensor
    expect: Optional[tuple]       # the recorded non-tensor returns (guards)
    reads: List[int]              # slots of the tensor arguments


class _Program(NamedTuple):
    program: Any                  # torch.classes.fqvit_int.ReplayProgram
    out_slots: List[int]
    spec: TreeSpec                # the structure of the forward's output
    names: List[str]              # step names, for fallback messages


_SEEN = object()                  # a key called once: the next call records


class NotReplayable(RuntimeError):
    """The forward does something the recorded program cannot repeat (the reason says what)."""


def _written_args(func) -> List[int]:
    """Indices of the schema arguments the op writes into (its alias annotations)."""
    return [i for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write]


def _encode_value(v, who: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        if v not in _DTYPES:
            raise NotReplayable(f'{who}: dtype {v}')
        return _DTYPES[v]
    if isinstance(v, torch.memory_format):
        return _MEMORY_FORMATS[v]
    if isinstance(v, torch.layout):
        if v != torch.strided:
            raise NotReplayable(f'{who}: layout {v}')
        return 0
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, (list, tuple)) and all(isinstance(e, (bool, int, float)) for e in v):
        return tuple(v)
    raise NotReplayable(f'{who}: an argument of type {type(v).__name__} ({repr(v)[:60]})')


class _Recorder(TorchDispatchMode):
    """Records dispatcher calls into a program description (slots, constants, steps)."""

    def __init__(self, inputs: List[torch.Tensor]):
        super().__init__()
        self.slot_of: Dict[int, int] = {}
        # per slot: the constant itself, or a weak reference to a computed tensor (the recording
        # does not keep a forward's intermediates alive; ids are checked against the referent)
        self.tensors: List[Any] = []
        self.const = []                              # per slot: True for a constant
        self.const_storages = set()
        self.steps: List[_Step] = []
        self.error: Optional[str] = None
        for t in inputs:
            self._new_slot(t, const=False)

    def _new_slot(self, t: torch.Tensor, const: bool) -> int:
        s = len(self.tensors)
        self.slot_of[id(t)] = s
        self.tensors.append(t if const else weakref.ref(t))
        self.const.append(const)
        if const and t.device.type == 'cpu':
            self.const_storages.add(t.untyped_storage().data_ptr())
        return s

    def tensor(self, s: int) -> Optional[torch.Tensor]:
        return self.tensors[s] if self.const[s] else self.tensors[s]()

    def _known(self, t: torch.Tensor) -> Optional[int]:
        """The slot of this very tensor, or None."""
        s = self.slot_of.get(id(t))
        return s if s is not None and self.tensor(s) is t else None

    def _slot(self, t: torch.Tensor) -> int:
        s = self._known(t)
        return self._new_slot(t, const=True) if s is None else s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.error is None:
            try:
                self._record(func, args, kwargs, out)
            except NotReplayable as e:
                self.error = str(e)
        return out

    def _record(self, func, args, kwargs, out):
        schema = func._schema
        who = f'{schema.name}.{schema.overload_name or "default"}'
        values = []
        for i, a in enumerate(schema.arguments):
            if i < len(args) and not a.kwarg_only:
                values.append(args[i])
            elif a.name in kwargs:
                values.append(kwargs[a.name])
            elif a.has_default_value():
                values.append(a.default_value)
            else:
                raise NotReplayable(f'{who}: argument {a.name} missing')
        enc, reads = [], []
        for a, v in zip(schema.arguments, values):
            kind = str(a.type)
            if isinstance(v, torch.Tensor):
                s = self._slot(v)
                enc.append((_SLOT, s))
                reads.append(s)
            elif kind.startswith('List[') and 'Tensor' in kind and v is not None:
                ss = tuple(-1 if t is None else self._slot(t) for t in v)
                enc.append((_OPT_SLOT_LIST if 'Optional' in kind else _SLOT_LIST, ss))
                reads.extend(s for s in ss if s >= 0)
            else:
                enc.append((_VALUE, _encode_value(v, who)))
        dynamic = any(not self.const[s] for s in reads)
        written = _written_args(func)
        for i in written:
            v = values[i]
            ts = v if isinstance(v, (list, tuple)) else [v]
            for t in ts:
                if isinstance(t, torch.Tensor) and (
                        self.const[self._slot(t)]
                        or t.untyped_storage().data_ptr() in self.const_storages):
                    raise NotReplayable(f'{who} writes into a constant tensor')
        rets, _ = tree_flatten(out)
        tensor_rets = [r for r in rets if isinstance(r, torch.Tensor)]
        others = [r for r in rets if not isinstance(r, torch.Tensor) and r is not None]
        if not written and rets and len(tensor_rets) == len(rets) and all(
                self._known(r) is not None for r in tensor_rets):
            return                       # returns its inputs: nothing to repeat
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise NotReplayable(f'{who}: a random op')
        if reads and not dynamic and not written:
            for r in tensor_rets:        # computed once: its outputs are constants
                if self._known(r) is None:
                    self._new_slot(r, const=True)
            return
        outs = []
        for r in tensor_rets:
            s = self._known(r)
            outs.append(self._new_slot(r, const=False) if s is None else s)
        for o in others:
            if not isinstance(o, (bool, int, float)):
                raise NotReplayable(f'{who} returns {type(o).__name__}')
        self.steps.append(_Step(schema.name, schema.overload_name, tuple(enc), outs,
                                tuple(others) if others else None, reads))


def _build_program(rec: _Recorder, out_slots: List[int]):
    n = len(rec.tensors)
    last = {}
    for i, st in enumerate(rec.steps):
        for s in st.reads:
            last[s] = i
        for s in st.outs:
            last.setdefault(s, i)
    keep = set(out_slots)
    release: List[List[int]] = [[] for _ in rec.steps]
    for s, i in last.items():
        if not rec.const[s] and s not in keep:
            release[i].append(s)
    prog = torch.classes.fqvit_int.ReplayProgram()
    prog.set_slots(n)
    for s in range(n):
        if rec.const[s]:
            prog.set_const(s, rec.tensors[s])
    for st, rel in zip(rec.steps, release):
        prog.add_step(st.name, st.overload, st.args, st.outs, st.expect, rel)
    return prog


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


class ReplayedModule(nn.Module):
    """``module`` whose forward is recorded once per input shape and then replayed from C++
    (see the module docstring). ``stats``: replays, eager calls, recordings, guard fallbacks,
    and the reasons of programs not kept."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._programs: Dict[tuple, Any] = {}    # key → _SEEN, a _Program, or None (declined)
        self.stats = dict(replays=0, eager=0, recorded=0, fallbacks=0, declined={},
                          last_fallback=None)

    def reset(self) -> None:
        """Forget the recorded programs (after the wrapped model changed)."""
        self._programs.clear()

    @staticmethod
    def _key(args, kwargs) -> Optional[tuple]:
        if kwargs or torch.is_grad_enabled() or not args:
            return None
        key = []
        for a in args:
            if not isinstance(a, torch.Tensor) or a.device.type != 'cpu' or a.requires_grad:
                return None
            key.append((tuple(a.shape), a.stride(), a.dtype))
        return tuple(key) + (torch.is_inference_mode_enabled(),)

    def _eager(self, args, kwargs):
        self.stats['eager'] += 1
        return self.module(*args, **kwargs)

    def _record(self, key, args):
        rec = _Recorder(list(args))
        with rec:
            out = self.module(*args)
        flat, spec = tree_flatten(out)
        if rec.error is None and not all(isinstance(t, torch.Tensor) for t in flat):
            rec.error = 'the forward returns values other than tensors'
        if rec.error is None:
            out_slots = [rec._slot(t) for t in flat]
            prog = _build_program(rec, out_slots)
            # a check that nothing the outputs depend on escaped the recording
            again = prog.run(list(args), out_slots)
            if not (len(again) == len(flat) and all(map(_same_bits, again, flat))):
                rec.error = 'the recorded program does not reproduce the eager outputs'
        if rec.error is None:
            names = [f'{st.name}.{st.overload or "default"}' for st in rec.steps]
            self._programs[key] = _Program(prog, out_slots, spec, names)
            self.stats['recorded'] += 1
        else:
            self._programs[key] = None
            self.stats['declined'][str(key)] = rec.error
        return out

    def forward(self, *args, **kwargs):
        key = self._key(args, kwargs)
        if key is None or kernels.native() is None:
            return self._eager(args, kwargs)
        if key not in self._programs:
            self._programs[key] = _SEEN
            return self._eager(args, kwargs)
        entry = self._programs[key]
        if entry is _SEEN:
            self.stats['eager'] += 1
            return self._record(key, args)
        if entry is None:
            return self._eager(args, kwargs)
        outs = entry.program.run(list(args), entry.out_slots)
        if not outs:
            self.stats['fallbacks'] += 1
            i = entry.program.failed_step()
            self.stats['last_fallback'] = f'step {i} ({entry.names[i]}) gave another value'
            return self._eager(args, kwargs)
        self.stats['replays'] += 1
        return tree_unflatten(list(outs), entry.spec)


def replay(module: nn.Module) -> ReplayedModule:
    """Wrap ``module`` (an integer model from ``to_integer`` or any inference module) so that
    its forward is replayed from C++ after two calls with the same input shape."""
    return ReplayedModule(module)
