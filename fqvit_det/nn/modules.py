"""Quantized drop-in modules. Each holds one quantizer per tensor role (``None`` = stays float).

Modules never decide *which* quantizer a role gets: that comes from the preset through the
converters in ``fqvit_det.convert``. Weight quantizers are calibrated from the weights themselves
(``calibrate_weight``); activation quantizers see data through the calibration runner. A weight
quantizer that compensates with the layer inputs (GPTQ) is also fed, in its 'observe' mode, the
module's (quantized) input rows (``observe_layer_input``; convolutions unfold them).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers.base import Quantizer
from ..quantizers.uniform import UniformQuantizer
from .exact import float64_gemm_on


def _apply(q: Optional[Quantizer], x: torch.Tensor) -> torch.Tensor:
    return x if q is None else q(x)


class _ExactConstants(NamedTuple):
    """A layer's integer-exact constants for one input grid (``key``: device, Δ_x)."""
    key: tuple
    codes64: torch.Tensor       # centred weight codes
    codes32: torch.Tensor
    acc_scale: torch.Tensor     # float32 Δ_x·Δ_w[c]
    sum_bound: float            # K·max|w code|: times max|x code| bounds every partial sum


def compensates_with_inputs(q: Optional[Quantizer]) -> bool:
    """A weight quantizer that needs the layer's inputs (GPTQ's Hessian), not the weight alone."""
    return q is not None and getattr(q, 'observes_layer_input', False)


class QuantModule(nn.Module):
    """Marker base: a module whose quantizers the runner drives."""

    def calibrate_weight(self) -> None:
        """Observe and finalize the weight quantizer (no data needed)."""

    def refresh(self) -> None:
        """Drop caches derived from quantizer parameters (after a search or reparameterization)."""

    def input_channel_scale(self) -> Optional[torch.Tensor]:
        """The per-input-channel activation scale folded into the weight before it is quantized
        (shaped to broadcast over the weight), or None."""
        return None


class _WeightQuantMixin(QuantModule):
    w_quantizer: Optional[Quantizer]

    def calibrate_weight(self):
        wq = self.w_quantizer
        if wq is None:
            return
        mode = wq.mode
        wq.reset()
        s = self.input_channel_scale()
        if compensates_with_inputs(wq):
            if s is not None:
                raise ValueError(f'{type(self).__name__}: a GPTQ weight quantizer cannot be combined '
                                 f'with a per-channel input quantizer folded into the weight; use a '
                                 f'per-tensor input quantizer or a non-GPTQ weight quantizer here')
            # GPTQ: bind the weight and round to nearest now; the runner's GPTQ pass feeds the
            # layer inputs (``observe_layer_input``) and finalizes again with them.
            wq.bind_weight(self.weight.detach(), groups=getattr(self, 'groups', 1))
        else:
            wq.observe(self.weight.detach() if s is None else self.weight.detach() * s)
        wq.finalize()
        wq.mode = mode if mode != 'observe' else 'float'
        self.refresh()

    def observe_layer_input(self, x: torch.Tensor) -> None:
        """Feed the (quantized) input a weight quantizer that compensates with inputs (GPTQ)
        collects while it is in 'observe' mode: the rows the weight multiplies."""
        wq = self.w_quantizer
        if wq is not None and wq.mode == 'observe' and compensates_with_inputs(wq):
            wq(self.input_rows(x.detach()))

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` or ``[G, N, K]``: the vectors each output row of the weight multiplies."""
        raise NotImplementedError

    def refresh(self):
        self._wq_cache = None
        self._exact_cache = None

    # Integer-exact arithmetic (``fqvit_det.nn.exact.set_exact_arithmetic``): (the quantizer whose
    # grid the input is on,) when on; the GEMM then runs on the codes.
    _exact = None
    _exact_cache = None
    _float64_gemm = False

    def _exact_step(self):
        """The input step Δ_x when the GEMM can run on codes now, else None."""
        from .exact import exact_unit
        exact = self._exact
        # the weight grid was checked by ``set_exact_arithmetic``; only its mode can change
        if exact is None or torch.is_grad_enabled() or self.w_quantizer.mode != 'quant':
            return None
        iq = self.in_quantizer
        if iq is not None and iq is not exact[0]:
            return None
        return exact_unit(exact[0])

    def _exact_operands(self, x: torch.Tensor, unit: torch.Tensor):
        """(input codes − z_x, centred weight codes, float32 Δ_x·Δ_w[c]): the codes as float32
        when every partial sum of the GEMM is an integer below 2^24 (then exact in any summation
        order), else as float64 (exact below 2^53)."""
        from .exact import exact_linear_constants
        cache = self._exact_cache
        key = (x.device, float(unit))
        if cache is None or cache.key != key:
            wc, acc_scale = exact_linear_constants(self, unit)
            cache = self._exact_cache = _ExactConstants(
                key, wc.to(x.device), wc.float().to(x.device), acc_scale.to(x.device),
                wc[0].numel() * float(wc.abs().max()))
        xc = torch.round(x / unit.to(x.device))
        if cache.sum_bound * float(xc.abs().max()) < 2 ** 24:
            return xc, cache.codes32, cache.acc_scale
        return xc.to(torch.float64), cache.codes64, cache.acc_scale

    @classmethod
    def _adopt(cls, src: nn.Module, attrs, w_quantizer, in_quantizer, out_quantizer=None):
        """A quantized twin sharing ``src``'s parameters (no copy) and layer hyper-parameters."""
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        for attr in attrs:
            setattr(mod, attr, getattr(src, attr))
        mod.weight, mod.bias = src.weight, src.bias
        mod.w_quantizer, mod.in_quantizer = w_quantizer, in_quantizer
        mod.out_quantizer = out_quantizer
        mod._wq_cache = None
        # Empirical bias correction (``calibration.bias_correction``), added while quantizing;
        # saved in the quant state, not in the model's state dict.
        mod.register_buffer('bias_correction', None, persistent=False)
        return mod

    @property
    def quantizing(self) -> bool:
        return any(q is not None and q.mode == 'quant' for q in (self.w_quantizer, self.in_quantizer))

    def _corrected(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        bc = getattr(self, 'bias_correction', None)
        if bc is None or not self.quantizing:
            return y
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        return y + bc.reshape(shape)

    def quant_weight(self) -> torch.Tensor:
        wq = self.w_quantizer
        if wq is None or wq.mode != 'quant':
            return self.weight
        s = self.input_channel_scale()
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return wq.fake_quant(self.weight) if s is None else wq.fake_quant(self.weight * s) / s
        cache = getattr(self, '_wq_cache', None)
        if cache is None or cache.device != self.weight.device:
            w = self.weight.detach()
            cache = wq.fake_quant(w) if s is None else wq.fake_quant(w * s) / s
            self._wq_cache = cache
        return cache


class QuantLinear(nn.Linear, _WeightQuantMixin):
    """Linear with weight, input and output quantizers (roles chosen by the converter)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_quantizer=None, in_quantizer=None, out_quantizer=None):
        return cls._adopt(linear, ('in_features', 'out_features'), w_quantizer, in_quantizer,
                          out_quantizer)

    def input_rows(self, x):
        return x.reshape(-1, self.in_features)

    def forward(self, x):
        x = _apply(self.in_quantizer, x)
        unit = self._exact_step()
        if unit is not None:      # integer-exact: float32(Σ codes·codes)·Δ_x·Δ_w + bias
            xc, wc, acc_scale = self._exact_operands(x, unit)
            y = F.linear(xc, wc).to(torch.float32) * acc_scale
            y = y if self.bias is None else y + self.bias
            return _apply(self.out_quantizer, y)
        if float64_gemm_on(self):    # float input: float32(Σ x·ŵ in float64) + bias
            y = F.linear(x.double(), self.quant_weight().double()).to(torch.float32)
            y = y if self.bias is None else y + self.bias
            return _apply(self.out_quantizer, y)
        self.observe_layer_input(x)
        y = self._corrected(F.linear(x, self.quant_weight(), self.bias), -1)
        return _apply(self.out_quantizer, y)


def is_patch_conv(conv: nn.Conv2d) -> bool:
    """A convolution over non-overlapping patches (kernel = stride, no padding, dilation 1, one
    group): a GEMM on the flattened patches."""
    return (tuple(conv.kernel_size) == tuple(conv.stride) and tuple(conv.padding) == (0, 0)
            and conv.groups == 1 and tuple(conv.dilation) == (1, 1))


class QuantConv2d(nn.Conv2d, _WeightQuantMixin):
    """Conv2d with weight, input and output quantizers.

    A per-channel uniform input quantizer (``ch_axis=1``, scales s_c, zero points z_c) stays
    integer-exact: a depthwise conv reads one input channel per output channel, so s_c factors
    out of each sum; a dense conv (``groups=1``) folds s_c into its weight before quantizing it,
    Ŵ = Q(W·diag(s))·diag(s)⁻¹, so that conv(x̂, Ŵ) = conv(q − z, Q(W·diag(s))): integer codes
    times one integer weight tensor with per-output-channel scales (RepQ-ViT §4.2 folds
    per-channel LayerNorm-output scales into the next Linear the same way).
    """

    def input_channel_scale(self):
        iq = self.in_quantizer
        if (self.groups != 1 or self.w_quantizer is None or not isinstance(iq, UniformQuantizer)
                or iq.ch_axis not in (1, -3) or not bool(iq.calibrated) or iq.scale.numel() == 1):
            return None
        return iq.scale.reshape(1, -1, 1, 1).to(self.weight.dtype)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_quantizer=None, in_quantizer=None, out_quantizer=None):
        return cls._adopt(conv, ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding',
                                 'dilation', 'transposed', 'output_padding', 'groups', 'padding_mode',
                                 '_reversed_padding_repeated_twice'), w_quantizer, in_quantizer,
                          out_quantizer)

    def input_rows(self, x):
        """im2col: ``F.unfold`` patches, ``[G, B·L, (C/G)·kh·kw]`` in the flattened weight's
        (channel, kh, kw) column order; a depthwise conv gives one kh·kw slice per channel."""
        padding = self.padding
        if self.padding_mode != 'zeros' or isinstance(padding, str):
            mode = 'constant' if self.padding_mode == 'zeros' else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        if x.dim() == 3:   # unbatched input
            x = x.unsqueeze(0)
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=padding,
                        stride=self.stride)                          # [B, C·kh·kw, L]
        B, CK, L = cols.shape
        G = self.groups
        return cols.reshape(B, G, CK // G, L).permute(1, 0, 3, 2).reshape(G, B * L, CK // G)

    def forward(self, x):
        x = _apply(self.in_quantizer, x)
        unit = self._exact_step() if self.padding_mode == 'zeros' else None
        if unit is not None:      # integer-exact (see QuantLinear)
            xc, wc, acc_scale = self._exact_operands(x, unit)
            y = F.conv2d(xc, wc, None, self.stride, self.padding, self.dilation, self.groups)
            y = y.to(torch.float32) * acc_scale.reshape(-1, 1, 1)
            y = y if self.bias is None else y + self.bias.reshape(-1, 1, 1)
            return _apply(self.out_quantizer, y)
        if float64_gemm_on(self):    # a float-input patch convolution (see QuantLinear)
            y = F.conv2d(x.double(), self.quant_weight().double(), None, self.stride).to(torch.float32)
            y = y if self.bias is None else y + self.bias.reshape(-1, 1, 1)
            return _apply(self.out_quantizer, y)
        self.observe_layer_input(x)
        y = self._corrected(self._conv_forward(x, self.quant_weight(), self.bias), 1)
        return _apply(self.out_quantizer, y)


class IntegerInput:
    """A quantizer's codes as FQ-ViT's integer LayerNorm reads them: (q − z)·2^α_c in units of Δ_1.

    Wraps a ``PTFQuantizer`` (channel factors α_c) or a per-tensor unsigned ``UniformQuantizer``
    (α = 0, Δ_1 = its scale, as FQ-ViT's Swin patch-embedding norm consumes a layer-wise
    quantizer). ``expand`` > 1 serves a norm over ``expand`` concatenated copies of the quantized
    channels (Swin patch merging): ``'repeat'`` for channel ``k·C + c`` (timm), ``'interleave'``
    for ``c·k + p`` (mmdet's ``nn.Unfold``). Provides what ``int_layernorm_fake_quant`` reads.
    """

    ch_axis = -1

    def __init__(self, quantizer: Quantizer, expand: int = 1, expand_mode: str = 'repeat'):
        self.quantizer, self.expand, self.expand_mode = quantizer, expand, expand_mode
        self.qname = getattr(quantizer, 'qname', type(quantizer).__name__)

    @staticmethod
    def supports(q) -> bool:
        from ..quantizers.ptf import PTFQuantizer
        from ..quantizers.uniform import UniformQuantizer
        if isinstance(q, PTFQuantizer):
            return True
        return (type(q) is UniformQuantizer and q.ch_axis is None and not q.signed
                and q.scale.numel() == 1)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        if self.expand == 1 or t.numel() == 1:
            return t
        if self.expand_mode == 'repeat':
            return t.reshape(-1).repeat(self.expand)
        return t.reshape(-1).repeat_interleave(self.expand)

    @property
    def bits(self):
        return self.quantizer.bits

    @property
    def qmax(self):
        return self.quantizer.qmax

    @property
    def zero_point(self):
        return self.quantizer.zero_point.reshape(())

    @property
    def base_scale(self):
        q = self.quantizer
        return (q.base_scale if hasattr(q, 'base_scale') else q.scale).reshape(())

    @property
    def alpha(self):
        q = self.quantizer
        if hasattr(q, 'alpha'):
            return self._expand(q.alpha)
        return torch.zeros((), dtype=torch.long, device=q.scale.device)

    @property
    def channel_scale(self):
        return self.base_scale * torch.pow(2.0, self.alpha.to(self.base_scale.dtype))

    def shifted_codes(self, x: torch.Tensor) -> torch.Tensor:
        s = self.channel_scale
        z = self.zero_point
        q = torch.clamp(torch.round(x / s) + z, 0, self.qmax) - z
        return (q * torch.pow(2.0, self.alpha.to(q.dtype))).round().to(torch.int32)


def integer_output_ok(q) -> bool:
    """Integer LayerNorm emits unsigned per-tensor uniform codes only."""
    from ..quantizers.uniform import UniformQuantizer
    return type(q) is UniformQuantizer and q.ch_axis is None and not q.signed


class QuantLayerNorm(nn.LayerNorm, QuantModule):
    """LayerNorm with an input quantizer and an output quantizer.

    FQ-ViT quantizes the residual stream where it is produced (the sums ``x + attn(..)``,
    ``x + mlp(..)``, the embeddings); the norm then reads a tensor already quantized by that
    *source* quantizer (``consume``), which it does not apply again. Its integer mode reads the
    source's codes. Likewise ``emit_to`` names a quantizer applied downstream (ViT's head input)
    whose scale the integer output uses. Both links are plain references: the linked quantizers
    belong to (and are calibrated, saved and moved with) the modules that apply them.

    Integer mode (FQ-ViT ``int_layernorm``) runs once both quantizers are in 'quant' mode, when
    the input is PTF or per-tensor unsigned uniform and the output is per-tensor unsigned uniform;
    otherwise it is float LayerNorm on the (fake-)quantized input.
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
        mod._links = {}
        return mod

    # --- links to quantizers applied elsewhere (tuples: never registered as sub-modules) ---
    def consume(self, source: Optional[Quantizer], expand: int = 1, expand_mode: str = 'repeat'):
        """The input arrives quantized by ``source`` (quantize once: no input quantizer here)."""
        if source is not None and self.in_quantizer is not None:
            raise ValueError(f'{source.qname} already quantizes the input of this LayerNorm, which '
                             f'also has its own input quantizer {self.in_quantizer.qname}: set '
                             'quant_cfg.roles.ln_input=None (the residual-stream roles replace it)')
        self._links['source'] = None if source is None else (source, expand, expand_mode)

    def emit_to(self, target: Optional[Quantizer]):
        """Integer mode writes codes on ``target``'s grid (a quantizer applied downstream)."""
        self._links['target'] = None if target is None else (target,)

    @property
    def input_source(self) -> Optional[Quantizer]:
        link = getattr(self, '_links', {}).get('source')
        return link[0] if link else None

    @property
    def output_target(self) -> Optional[Quantizer]:
        link = getattr(self, '_links', {}).get('target')
        return link[0] if link else None

    def _integer_pair(self):
        """(integer input view, output quantizer) when integer mode can run now, else None."""
        if not self.integer:
            return None
        if self.in_quantizer is not None:
            iq, expand, mode = self.in_quantizer, 1, 'repeat'
        else:
            link = getattr(self, '_links', {}).get('source')
            if link is None:
                return None
            iq, expand, mode = link
        oq = self.out_quantizer if self.out_quantizer is not None else self.output_target
        if oq is None or iq.mode != 'quant' or oq.mode != 'quant':
            return None
        if not IntegerInput.supports(iq) or not integer_output_ok(oq) or oq.scale.numel() != 1:
            return None
        return IntegerInput(iq, expand, mode), oq

    def forward(self, x):
        pair = self._integer_pair()
        if pair is not None:
            # = out.dequantize(int_layernorm(input codes, ...)), fused
            from ..quantizers.ptf import int_layernorm_fake_quant
            return int_layernorm_fake_quant(x, pair[0], self.weight, self.bias, pair[1],
                                            eps=self.eps)
        x = _apply(self.in_quantizer, x)
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return _apply(self.out_quantizer, y)


class AttentionQuantizers(QuantModule):
    """Quantizers of one attention: q, k, v, scores, logits, probabilities, bias and mask.

    Order (FQ-ViT ``swin_quant.py``): ``scores`` = QKᵀ·scale, quantized only where a
    relative-position bias is added (ViT has no bias: its scores *are* the logits); logits =
    scores + bias, quantized by ``logits``; then the shifted-window mask is added (after the logit
    quantizer, so the −100 mask never widens its range); softmax; ``probs``. ``probs`` may be a
    ``LogIntSoftmax``, which quantizes the logits itself and replaces both the logits quantizer and
    the softmax; it observes the unmasked logits too.
    """

    # Layer-search hook (``fqvit_det.search.capture``): when set, a callable
    # ``_recorder(aq, q, k, v, scale, bias, mask, mask_fn)`` sees the unquantized operands of every
    # ``attend`` call. Class-level None, so the normal path costs one attribute test.
    _recorder = None

    def __init__(self, q=None, k=None, v=None, logits=None, probs=None, rel_pos_bias=None,
                 mask=None, scores=None):
        super().__init__()
        self.q, self.k, self.v = q, k, v
        self.scores = scores
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
        if self._exact is not None and bias is None and mask is None and not torch.is_grad_enabled():
            out = self._attend_exact(q, k, v, scale)
            if out is not None:
                return out
        q, k, v = _apply(self.q, q), _apply(self.k, k), _apply(self.v, v)
        logits = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            logits = _apply(self.scores, logits) + _apply(self.rel_pos_bias, bias)
        if not self.fused_softmax:
            logits = _apply(self.logits, logits)
        if mask is not None:
            if self.fused_softmax and self.probs.mode == 'observe':
                self.probs(logits)  # LIS observes its logits before the mask is added
            mask = _apply(self.mask, mask)
            logits = mask_fn(logits, mask) if mask_fn is not None else logits + mask
            if self.fused_softmax and self.probs.mode == 'observe':
                return logits.softmax(dim=-1) @ v
        return self._probs(logits) @ v

    def _probs(self, logits):
        if self.fused_softmax:
            return self.probs(logits)
        return _apply(self.probs, logits.softmax(dim=-1))

    # Integer-exact arithmetic (``fqvit_det.nn.exact``): (the quantizer q, k, v share, e.g. FQ-ViT's
    # qkv output, or None,) when on.
    _exact = None

    def _attend_exact(self, q, k, v, scale):
        """QKᵀ on the codes (exact), logits = float32(acc·Δ_q·Δ_k·scale) with the product in
        float64; P·V as
        float64(P̂) @ float64(v codes)·Δ_v rounded once to float32: ``IntegerAttention``'s
        formulas (method 'simulation'). None when q, k or v is not on a uniform grid."""
        from .exact import exact_grid
        shared = exact_grid(self._exact[0])
        vals, steps = [], []
        for quant, t in ((self.q, q), (self.k, k), (self.v, v)):
            step = exact_grid(quant) if quant is not None else shared
            if step is None or (quant is not None and quant.mode != 'quant'):
                return None
            vals.append(_apply(quant, t))
            steps.append(step.to(t.device))
        if self.probs is None or self.probs.mode != 'quant':
            return None
        (qv, kv, vv), (sq, sk, sv) = vals, steps
        qc, kc, vc = (torch.round(t / s) for t, s in ((qv, sq), (kv, sk), (vv, sv)))
        if qc.shape[-1] * float(qc.abs().max()) * float(kc.abs().max()) >= 2 ** 24:
            qc, kc = qc.double(), kc.double()      # else float32 partial sums are exact integers
        acc = (qc @ kc.transpose(-2, -1)).double()
        vc = vc.double()
        logits = (acc * (sq.double() * sk.double() * scale)).to(torch.float32)
        if not self.fused_softmax:
            logits = _apply(self.logits, logits)
        probs = self._probs(logits)
        return ((probs.to(torch.float64) @ vc) * sv.double()).to(torch.float32)
