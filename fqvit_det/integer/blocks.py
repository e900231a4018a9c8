"""The timm ViT block of an integer model (``finish_integer`` installs it).

``QuantTimmBlock`` forms each residual sum and then quantizes it (FQ-ViT's PTF residual stream),
and hands each LayerNorm's output values to a Linear that quantizes them again. In the integer
model two of those passes over the token tensor are joined to their neighbours, with the same
values:

* the residual sum and its PTF quantizer: ``CompiledPTFQuantizer.add_fake_quant`` (one pass);
* an integer LayerNorm and the input quantization of the integer Linear it feeds (``attn.qkv``,
  ``mlp.fc1``): ``CompiledIntLayerNorm.forward_codes`` writes that Linear's input codes instead
  of float values, which the Linear takes as they are.
"""
from typing import Optional, Tuple

from torch import nn

from ..nn.modules import _apply
from .layernorm import CompiledIntLayerNorm, CompiledPTFQuantizer, retype_modules
from .linear import IntegerLinear


def residual_sum(q, x, y):
    """``q(x + y)`` (x itself where q is None), in one pass where q is a compiled PTF quantizer."""
    if type(q) is CompiledPTFQuantizer:
        return q.add_fake_quant(x, y)
    return _apply(q, x + y)


def _fed_linear(norm, linear) -> Optional[IntegerLinear]:
    """``linear`` where ``norm`` is a compiled integer LayerNorm feeding that uniform-input
    integer Linear directly, else None."""
    if type(norm) is not CompiledIntLayerNorm or norm._integer_pair() is None \
            or not isinstance(linear, IntegerLinear) or linear.in_kind != 'uniform':
        return None
    return linear


class _FusedBlockForward(nn.Module):
    """The forward of ``IntegerTimmBlock``: ``QuantTimmBlock``'s with the fused passes of the
    module docstring (a base class of its own, so that this module imports without timm)."""

    def _code_links(self) -> Tuple[Optional[IntegerLinear], Optional[IntegerLinear]]:
        """(the Linear norm1 hands codes to, the one norm2 does), None where a norm does not."""
        from .convert import IntegerTimmAttention, _plain_timm_mlp
        attn = self.attn
        qkv = attn.qkv if isinstance(attn, IntegerTimmAttention) else None
        fc1 = self.mlp.fc1 if _plain_timm_mlp(self.mlp) else None
        return _fed_linear(self.norm1, qkv), _fed_linear(self.norm2, fc1)

    @staticmethod
    def _norm(norm, x, linear):
        return norm(x) if linear is None else norm.forward_codes(x, linear.input_grid())

    def forward(self, x, attn_mask=None, is_causal=False):
        links = getattr(self, '_code_links_cache', None)
        if links is None:
            links = self._code_links_cache = self._code_links()
        attn = self.attn(self._norm(self.norm1, x, links[0]), attn_mask=attn_mask,
                         is_causal=is_causal)
        x = residual_sum(self.attn_residual_quantizer, x, self.drop_path1(self.ls1(attn)))
        h = self._norm(self.norm2, x, links[1])
        return residual_sum(self.mlp_residual_quantizer, x, self.drop_path2(self.ls2(self.mlp(h))))


_BLOCK_CLASS = None


def _integer_block_class():
    """``IntegerTimmBlock``: a ``QuantTimmBlock`` with ``_FusedBlockForward``'s forward, made on
    first use (timm is imported then, not when this module is)."""
    global _BLOCK_CLASS
    if _BLOCK_CLASS is None:
        from ..convert.timm_vit import QuantTimmBlock

        class IntegerTimmBlock(_FusedBlockForward, QuantTimmBlock):
            """``QuantTimmBlock`` of an integer model: see the module docstring."""

        IntegerTimmBlock.__module__ = __name__
        IntegerTimmBlock.__qualname__ = 'IntegerTimmBlock'
        _BLOCK_CLASS = IntegerTimmBlock
    return _BLOCK_CLASS


def __getattr__(name):
    # ``fqvit_det.integer.blocks.IntegerTimmBlock`` (imports, pickling) without importing timm
    # before it is asked for
    if name == 'IntegerTimmBlock':
        return _integer_block_class()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def install_integer_blocks(model) -> int:
    """Make every ``QuantTimmBlock`` an ``IntegerTimmBlock`` (same state); returns how many
    (none without timm, where no such block can exist)."""
    try:
        from ..convert.timm_vit import QuantTimmBlock
    except ModuleNotFoundError as err:
        if err.name != 'timm':
            raise
        return 0
    return retype_modules(model, QuantTimmBlock, _integer_block_class())
