"""``to_integer``: a calibrated (simulated) model → a new module graph that computes with integers.

What runs integer, per method (timm DeiT / ViT):

=============================  ===========================  ========================================
part                           FQ-ViT                       PTQ4ViT / RepQ-ViT / AdaLog
=============================  ===========================  ========================================
qkv, proj, fc1, fc2, head      int8 GEMM (``_int_mm``),     int8 GEMM, int32 zero-point terms,
                               int32 zero-point terms,      exact float rescale (the papers keep
                               exact float32 rescale + bias; these outputs float); PTQ4ViT fc2 on
                               qkv / proj / fc2 / head      twin-uniform codes (two row blocks
                               outputs then rounded to the  joined by a shift); AdaLog fc2 reads
                               next quantizer's codes       log codes: simulated (float GEMM on
                               (``requant='float'``) or by  their values)
                               a dyadic multiplier
                               (``'dyadic'``); fc1 → float
patch embedding                int8 GEMM over patches       int8 GEMM (RepQ / AdaLog 8-bit image
                                                            codes); PTQ4ViT keeps the image float:
                                                            simulated
attention core                 ``IntegerAttention``: QKᵀ    ``IntegerAttention``: QKᵀ int8 GEMM,
                               int8 GEMM, logit codes,      float softmax (the methods keep it
                               codes, integer LIS, P·V by   float), probability codes, P·V on the
                               shifts on log2 codes         codes (twin / log√2 parity / AdaLog LUT)
LayerNorm                      integer (FQ-ViT I-LN on PTF  float (the methods keep it float)
                               codes, the bit-exact
                               integer algorithm of
                               ``QuantLayerNorm``)
residual add, GELU             float add of quantized       float (the methods keep them float)
                               values, PTF-quantized; GELU
                               float
=============================  ===========================  ========================================

Requantization (``requant``): ``'float'`` (default) rounds the float32 rescale of the exact
accumulator by the next quantizer's own formula, which is exactly what the integer-exact simulation
(``fqvit_det.nn.exact``) computes, so the two agree bit for bit; ``'dyadic'`` uses integer M·2^−N
multipliers (FQ-ViT's integer-only deployment), within one code of the exactly rounded value.
Whatever stays simulated (convolutions other than patch embeddings, Swin's windowed attention)
runs in integer-exact arithmetic too.

Codes pass directly between the qkv GEMM, the attention core and the proj GEMM where their grids
match; elsewhere modules exchange the dequantized values of the codes (exactly the simulated
values), and each integer GEMM quantizes its input itself with the simulation's quantizer.

``to_integer`` never mutates its argument: it deep-copies the calibrated model and swaps every
eligible quantized Linear / patch convolution for ``IntegerLinear`` / ``IntegerPatchEmbed``.
Modules left simulated keep their quantizers in 'quant' mode, so the result computes what the
simulation computes, with integer GEMMs where the codes allow them.
"""
import copy
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..log import get_logger
from ..nn.exact import RationalGELU, rational_gelu
from ..nn.modules import QuantConv2d, QuantLayerNorm, QuantLinear
from ..quantizers.uniform import UniformQuantizer
from ..walk import feeding_norms
from .layernorm import compile_integer_layernorms, compile_ptf_quantizers
from .linear import IntegerLinear, IntegerPatchEmbed, _native_ops, integer_input_ok


def _quant_on(q) -> bool:
    return q is not None and getattr(q, 'mode', None) == 'quant'


def _input_ok(q) -> bool:
    from ..quantizers.twin import TwinUniformGeluQuantizer
    return _quant_on(q) and (integer_input_ok(q) or isinstance(q, TwinUniformGeluQuantizer))


def _weight_ok(mod) -> bool:
    wq = mod.w_quantizer
    return (_quant_on(wq) and type(wq) is UniformQuantizer and wq.bits <= 8
            and (wq.ch_axis is None or wq.ch_axis % mod.weight.dim() == 0))


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _norm_is_integer(norm) -> bool:
    return isinstance(norm, QuantLayerNorm) and norm._integer_pair() is not None


def plan_integer(model: nn.Module) -> List[Tuple[str, str, Optional[str]]]:
    """(module path, 'linear' | 'patch', feeding norm path whose output quantizer is the input
    grid, or None) for every module ``to_integer`` converts."""
    feeds = feeding_norms(model)
    plan = []
    for path, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            norm_path = None
            in_q = mod.in_quantizer
            if in_q is None and path in feeds:
                norm_path = feeds[path]
                in_q = getattr(model.get_submodule(norm_path), 'out_quantizer', None)
            if _weight_ok(mod) and _input_ok(in_q):
                plan.append((path, 'linear', norm_path if mod.in_quantizer is None else None))
        elif isinstance(mod, QuantConv2d):
            if (_weight_ok(mod) and integer_input_ok(mod.in_quantizer) and _quant_on(mod.in_quantizer)
                    and IntegerPatchEmbed.supports(mod)):
                plan.append((path, 'patch', None))
    return plan


def _integer_linear(mod, in_q, requant: str) -> IntegerLinear:
    out_q = mod.out_quantizer if _quant_on(mod.out_quantizer) else None
    return IntegerLinear.from_quant(mod.weight, mod.bias, mod.w_quantizer, in_q, out_q, requant=requant)


class IntegerTimmAttention(nn.Module):
    """timm attention with the core (QKᵀ, softmax, P·V) on integer codes (``IntegerAttention``,
    helper ``intattn``'s kernels): qkv → codes → attention → proj_input values → proj.
    ``core_config`` rebuilds an empty core for loading (``attn`` then only lends qkv / proj)."""

    def __init__(self, attn: nn.Module, core_config: Optional[dict] = None,
                 method: str = 'simulation'):
        super().__init__()
        from .attention import IntegerAttention
        self.core = (IntegerAttention(attn, method=method) if core_config is None
                     else IntegerAttention(config=core_config))
        self.qkv, self.proj = attn.qkv, attn.proj
        self.proj_drop = attn.proj_drop

    def _same_grid(self, lin, scale, zero) -> bool:
        return (scale.numel() == 1 and zero.numel() == 1
                and float(lin.out_scale if lin is self.qkv else lin.in_scale) == float(scale)
                and int(lin.out_zero_point if lin is self.qkv else lin.in_zero_point) == int(zero))

    def _code_links(self):
        """(qkv hands codes to the core, the core hands codes to proj): where the integer GEMM's
        output grid is the core's input grid (FQ-ViT's qkv_output) and the core's output grid is
        proj's input grid (proj_input), codes pass directly, with no dequantize / quantize pair."""
        core = self.core
        qkv_codes = (isinstance(self.qkv, IntegerLinear) and self.qkv.out_mode in ('dyadic', 'requant')
                     and core.cfg.get('shared_qkv', False)
                     and self._same_grid(self.qkv, core.q_scale, core.q_zero))
        proj_codes = (isinstance(self.proj, IntegerLinear) and self.proj.in_kind == 'uniform'
                      and core.out_scale.numel() > 0
                      and self._same_grid(self.proj, core.out_scale, core.out_zero))
        return qkv_codes, proj_codes

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError('IntegerTimmAttention: masks are not supported')
        links = getattr(self, '_code_links_cache', None)
        if links is None:
            links = self._code_links_cache = self._code_links()
        out = self._fused(x, links[0])
        if out is None:
            qkv = self.qkv.forward_codes(x) if links[0] else self.qkv(x)
            out = self.core(qkv, dequantize=not links[1])
        elif not links[1]:
            out = self.core.dequantize_out(out)
        return self.proj_drop(self.proj(out))

    def _fused(self, x, codes_link: bool):
        """An integer qkv GEMM straight into the compiled core: its accumulator is rescaled and
        coded for q, k, v in one pass (the same values as ``self.qkv(x)`` then the core's
        quantizers); None where that path does not apply. A float-output qkv, or (on AMX tiles,
        whose product is never stored) a requant qkv handing its codes to the core
        (``codes_link``: FQ-ViT's shared qkv quantizer, whose grid and range are the core's, so
        its requantization is the core's coding of the rescaled product)."""
        lin = self.qkv
        if not (isinstance(lin, IntegerLinear) and lin.in_kind == 'uniform'
                and x.device.type == 'cpu' and x.dim() == 3):
            return None
        if codes_link:
            if lin.out_mode != 'requant' or \
                    tuple(self.core.cfg['q_range']) != (lin.out_qmin, lin.out_qmax):
                return None
        elif lin.out_mode != 'float' or self.core.cfg['shared_qkv']:
            return None
        setup = self.core._compiled_setup(x.shape[1], x.device)
        if setup is None:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        rescale = (lin.bias_int, lin.acc_scale, lin.bias_float)
        tiles = lin.tile_operands(x2)
        if tiles is not None:      # the product computed on AMX tiles inside the coding pass
            return self.core._tiles_forward(tiles, rescale, setup, x.shape[0])
        if codes_link:
            return None
        acc = lin.accumulate(x2, bias=False)
        return self.core._fused_forward(acc.view(x.shape[0], x.shape[1], -1), rescale=rescale,
                                        setup=setup)


def integer_attention_paths(model: nn.Module) -> List[str]:
    """Quantized timm attentions whose core ``IntegerAttention`` supports (others stay simulated)."""
    from ..convert.timm_vit import QuantTimmAttention
    from .attention import IntegerAttention
    paths = []
    for path, mod in model.named_modules():
        if isinstance(mod, QuantTimmAttention):
            try:
                IntegerAttention(mod)
            except (NotImplementedError, TypeError, ValueError) as err:
                get_logger().info(f'to_integer: {path} stays simulated ({err})')
                continue
            paths.append(path)
    return paths


def install_integer_attention(model: nn.Module, paths, configs=None,
                              method: str = 'simulation') -> None:
    """Swap the attentions at ``paths`` for ``IntegerTimmAttention`` (from the calibrated module,
    or empty from ``configs`` when loading)."""
    for i, path in enumerate(paths):
        cfg = None if configs is None else configs[i]
        _set_child(model, path, IntegerTimmAttention(model.get_submodule(path), cfg, method))


def adopt_norm_targets(model: nn.Module) -> None:
    """A LayerNorm that writes its integer output on the grid of a quantizer applied downstream
    (``emit_to``: FQ-ViT's final norm → head input) takes that quantizer as its own output
    quantizer, so it survives the replacement of the module that applied it."""
    for mod in model.modules():
        if isinstance(mod, QuantLayerNorm) and mod.out_quantizer is None and mod.output_target is not None:
            mod.out_quantizer = mod.output_target


@torch.no_grad()
def to_integer(model: nn.Module, attention: bool = True, requant: str = 'float') -> nn.Module:
    """A new module graph computing ``model`` (calibrated, quantizers in 'quant' mode) with
    integer GEMMs; ``model`` itself is left unchanged. Runs on the CPU or CUDA (the device of the
    model); integer constants are computed on the CPU.

    ``requant``: how an integer accumulator becomes the next quantizer's codes. ``'float'``
    (default): the exact accumulator rescaled in float32 and rounded by the quantizer's own
    formula, which is what the integer-exact simulation computes
    (``fqvit_det.nn.exact.set_exact_arithmetic``): the two agree bit for bit up to float64 rounding
    in P·V for irrational probability levels. ``'dyadic'``: integer-only M·2^−N multipliers
    (FQ-ViT's deployment arithmetic), within one code of the exactly rounded value."""
    if requant not in ('float', 'dyadic'):
        raise ValueError(f"to_integer: requant must be 'float' or 'dyadic', got {requant!r}")
    device = next(iter(model.parameters()), torch.zeros(())).device
    new = copy.deepcopy(model).cpu()
    adopt_norm_targets(new)
    plan = plan_integer(new)
    attention = integer_attention_paths(new) if attention else []
    install_integer_attention(new, attention, method='simulation' if requant == 'float' else 'dyadic')
    if not plan:
        raise ValueError('to_integer: no quantized Linear / patch convolution with a per-tensor '
                         'uniform input and a uniform weight quantizer in quant mode: calibrate first')
    for path, kind, norm_path in plan:
        mod = new.get_submodule(path)
        if kind == 'patch':
            w = mod.weight
            lin = IntegerLinear.from_quant(w, mod.bias, mod.w_quantizer, mod.in_quantizer,
                                           mod.out_quantizer if _quant_on(mod.out_quantizer) else None,
                                           requant=requant)
            _set_child(new, path, IntegerPatchEmbed(lin, mod.kernel_size, mod.out_channels))
            continue
        in_q = mod.in_quantizer
        if in_q is None:
            norm = new.get_submodule(norm_path)
            in_q = norm.out_quantizer
            if not _norm_is_integer(norm):
                # The integer Linear quantizes the norm output itself (same quantizer, same codes):
                # the norm's own fake quantization would be a second pass over the same values.
                norm.out_quantizer = None
        _set_child(new, path, _integer_linear(mod, in_q, requant))
    finish_integer(new)
    new.fqvit_integer_plan = [list(p) for p in plan]
    new.fqvit_integer_attention = attention
    get_logger().info(f'to_integer: {len(plan)} integer GEMM modules, {len(attention)} integer attentions')
    return new.to(device)


def finish_integer(model: nn.Module) -> None:
    """The last steps of ``to_integer`` and ``load_integer`` on a model whose integer modules are
    in place: GELUs fused into fc1's epilogue, the compiled integer LayerNorms and PTF
    quantizers, the integer ViT blocks (``blocks.py``: the residual sum joined to its quantizer,
    each integer LayerNorm handing codes to its Linear), and the integer-exact arithmetic for
    what stays simulated."""
    from ..nn.exact import set_exact_arithmetic
    from .blocks import install_integer_blocks
    fuse_inplace_activations(model)
    compile_integer_layernorms(model)
    compile_ptf_quantizers(model)
    install_integer_blocks(model)
    # what stays simulated (convolutions other than patch embeddings, Swin attention) computes
    # its GEMMs on the codes too, so the whole model is the integer-exact simulation's arithmetic
    set_exact_arithmetic(model)


class InPlaceRationalGELU(RationalGELU):
    """``rational_gelu`` (the exact arithmetic's GELU) in place, by the compiled kernel
    (``rational_gelu_``, the same float32 operations in the same order) where it builds: installed
    where the input is an integer fc1's float output, a fresh tensor nothing else reads, so the
    MLP allocates one hidden-size tensor instead of two."""

    def forward(self, x):
        ops = _native_ops(x, torch.float32) if x.is_contiguous() else None
        return ops.rational_gelu_(x) if ops is not None else rational_gelu(x)


class GELUInPreviousLayer(nn.Identity):
    """Marks a GELU that runs in the previous integer Linear's epilogue (with the next Linear's
    input quantization): its input is already the next layer's codes."""


def _plain_timm_mlp(mod: nn.Module) -> bool:
    """timm's ``Mlp`` (fc1 → act → drop1 → norm → fc2) with nothing between act and fc2 in eval."""
    return (type(mod).__name__ == 'Mlp' and type(mod).__module__.startswith('timm.')
            and type(getattr(mod, 'norm', None)) is nn.Identity
            and type(getattr(mod, 'drop1', None)) in (nn.Dropout, nn.Identity))


def fuse_inplace_activations(model: nn.Module) -> int:
    """The GELU between an integer fc1 (float output) and fc2: in timm's ``Mlp`` with a
    uniform-input integer fc2, fused into fc1's epilogue with fc2's input quantization
    (``IntegerLinear.fuse_gelu_quantize``), with a twin-uniform-input one (PTQ4ViT) with fc2's
    operand split (``fuse_gelu_twin``); ``act`` becomes ``GELUInPreviousLayer``. Elsewhere
    ``InPlaceRationalGELU``. Returns how many GELUs were replaced."""
    n = 0
    for mod in model.modules():
        fc1, act, fc2 = getattr(mod, 'fc1', None), getattr(mod, 'act', None), getattr(mod, 'fc2', None)
        if not (isinstance(fc1, IntegerLinear) and fc1.out_mode == 'float' and fc2 is not None
                and (type(act) is RationalGELU
                     or (type(act) is nn.GELU and act.approximate == 'none'))):
            continue
        if _plain_timm_mlp(mod) and isinstance(fc2, IntegerLinear) and fc2.in_kind == 'uniform':
            fc1.fuse_gelu_quantize(fc2)
            mod.act = GELUInPreviousLayer()
        elif _plain_timm_mlp(mod) and isinstance(fc2, IntegerLinear) \
                and fc2.in_kind == 'twin_gelu' and fc2.out_mode == 'float':
            fc1.fuse_gelu_twin(fc2)
            mod.act = GELUInPreviousLayer()
        else:
            mod.act = InPlaceRationalGELU()
        n += 1
    return n


def integer_modules(model: nn.Module):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, IntegerLinear)]
