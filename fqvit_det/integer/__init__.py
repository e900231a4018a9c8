"""Integer execution of calibrated models (issue 8): int8 GEMMs, integer requantization, export.

Pure torch (no mm* imports). ``to_integer(model)`` converts a calibrated simulated model;
``save_integer`` / ``load_integer`` write and read the integer model as safetensors.
"""
from .convert import integer_modules, plan_integer, to_integer
from .linear import IntegerLinear, IntegerPatchEmbed, int_mm, use_compiled_kernels

__all__ = ['to_integer', 'plan_integer', 'integer_modules', 'IntegerLinear', 'IntegerPatchEmbed',
           'int_mm', 'use_compiled_kernels']

from .export import load_integer, pack_int4, save_integer, unpack_int4  # noqa: E402
from .recording import ReplayedModule, replay  # noqa: E402

__all__ += ['save_integer', 'load_integer', 'pack_int4', 'unpack_int4', 'replay', 'ReplayedModule']
