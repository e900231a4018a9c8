"""Quantized drop-in modules. Each holds one quantizer per tensor role (``None`` = stays float).

Modules never decide *which* quantizer a role gets: that comes from the preset through the
converters in ``fqvit_det.convert``. Weight quantizers are calibrated from the weights themselves
(``calibrate_weight``); activation quantizers see data through the calibration runner.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers.base import Quantizer


def _apply(q: Optional[Quantizer], x: torch.Tensor) -> torch.Tensor:
    return x if q is None else q(x)


class QuantModule(nn.Module):
    """Marker base: a module whose quantizers the runner drives."""

    def calibrate_weight(self) -> None:
        """Observe and finalize the weight quantizer (no data needed)."""

    def refresh(self) -> None:
        """Drop caches derived from quantizer parameters (after a search or reparameterization)."""


class _WeightQuantMixin(QuantModule):
    w_quantizer: Optional[Quantizer]

    def calibrate_weight(self):
        wq = self.w_quantizer
        if wq is None:
            return
        mode = wq.mode
        wq.reset()
        wq.observe(self.weight.detach())
        wq.finalize()
        wq.mode = mode if mode != 'observe' else 'float'
        self.refresh()

    def refresh(self):
        self._wq_cache = None

    @classmethod
    def _adopt(cls, src: nn.Module, attrs, w_quantizer, in_quantizer):
        """A quantized twin sharing ``src``'s parameters (no copy) and layer hyper-parameters."""
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        for attr in attrs:
            setattr(mod, attr, getattr(src, attr))
        mod.weight, mod.bias = src.weight, src.bias
        mod.w_quantizer, mod.in_quantizer = w_quantizer, in_quantizer
        mod._wq_cache = None
        return mod

    def quant_weight(self) -> torch.Tensor:
        wq = self.w_quantizer
        if wq is None or wq.mode != 'quant':
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return wq.fake_quant(self.weight)
        cache = getattr(self, '_wq_cache', None)
        if cache is None or cache.device != self.weight.device:
            cache = wq.fake_quant(self.weight.detach())
            self._wq_cache = cache
        return cache


class QuantLinear(nn.Linear, _WeightQuantMixin):
    """Linear with a weight quantizer and an input quantizer (role chosen by the converter)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_quantizer=None, in_quantizer=None):
        return cls._adopt(linear, ('in_features', 'out_features'), w_quantizer, in_quantizer)

    def forward(self, x):
        return F.linear(_apply(self.in_quantizer, x), self.quant_weight(), self.bias)


class QuantConv2d(nn.Conv2d, _WeightQuantMixin):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_quantizer=None, in_quantizer=None):
        return cls._adopt(conv, ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding',
                                 'dilation', 'transposed', 'output_padding', 'groups', 'padding_mode',
                                 '_reversed_padding_repeated_twice'), w_quantizer, in_quantizer)

    def forward(self, x):
        return self._conv_forward(_apply(self.in_quantizer, x), self.quant_weight(), self.bias)


class QuantLayerNorm(nn.LayerNorm, QuantModule):
    """LayerNorm with an input quantizer (residual stream) and an output quantizer.

    With a ``PTFQuantizer`` on the input and a per-tensor uniform output quantizer, the normalization
    runs in FQ-ViT's integer mode (``int_layernorm``) once quantized; otherwise it is float LayerNorm
    on the (fake-)quantized input.
    """

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, in_quantizer=None, out_quantizer=None,
                   integer: bool = False):
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.normalized_shape = ln.normalized_shape
        mod.eps = ln.eps
        mod.elementwise_affine = ln.elementwise_affine
        mod.weight, mod.bias = ln.weight, ln.bias
        mod.in_quantizer = in_quantizer
        mod.out_quantizer = out_quantizer
        mod.integer = integer
        return mod

    def _integer_ready(self):
        return (self.integer and self.in_quantizer is not None and self.out_quantizer is not None
                and self.in_quantizer.mode == 'quant' and self.out_quantizer.mode == 'quant')

    def forward(self, x):
        if self._integer_ready():
            # = out_quantizer.dequantize(int_layernorm(in_quantizer.shifted_codes(x), ...)), fused
            from ..quantizers.ptf import int_layernorm_fake_quant
            return int_layernorm_fake_quant(x, self.in_quantizer, self.weight, self.bias,
                                            self.out_quantizer, eps=self.eps)
        x = _apply(self.in_quantizer, x)
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return _apply(self.out_quantizer, y)


class AttentionQuantizers(QuantModule):
    """Quantizers of one attention: q, k, v, logits (QKᵀ·scale + bias + mask), probabilities.

    ``probs`` may be a ``LogIntSoftmax``, which consumes the logits itself (FQ-ViT LIS) and then
    replaces both the logits quantizer and the softmax.
    """

    # Layer-search hook (``fqvit_det.search.capture``): when set, a callable
    # ``_recorder(aq, q, k, v, scale, bias, mask, mask_fn)`` sees the unquantized operands of every
    # ``attend`` call. Class-level None, so the normal path costs one attribute test.
    _recorder = None

    def __init__(self, q=None, k=None, v=None, logits=None, probs=None, rel_pos_bias=None,
                 mask=None):
        super().__init__()
        self.q, self.k, self.v = q, k, v
        self.logits, self.probs = logits, probs
        self.rel_pos_bias, self.mask = rel_pos_bias, mask

    @property
    def fused_softmax(self) -> bool:
        return self.probs is not None and getattr(self.probs, 'replaces_softmax', False)

    def attend(self, q, k, v, scale, bias=None, mask=None, mask_fn=None):
        """softmax(q̂ k̂ᵀ·scale + bias + mask) · v̂ with every role quantized.

        ``mask_fn(logits, mask)`` lets callers apply masks of their own shape (Swin windows).
        """
        if self._recorder is not None:
            self._recorder(self, q, k, v, scale, bias, mask, mask_fn)
        q, k, v = _apply(self.q, q), _apply(self.k, k), _apply(self.v, v)
        logits = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + _apply(self.rel_pos_bias, bias)
        if mask is not None:
            mask = _apply(self.mask, mask)
            logits = mask_fn(logits, mask) if mask_fn is not None else logits + mask
        if self.fused_softmax:
            probs = self.probs(logits)
        else:
            probs = _apply(self.probs, _apply(self.logits, logits).softmax(dim=-1))
        return probs @ v
