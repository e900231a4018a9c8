"""mmpretrain ``ImageClassifier`` with a ``VisionTransformer`` backbone (DeiT / ViT): the same
tensor roles as timm's ViT (``timm_vit.py``), on mmpretrain's module names.

mmpretrain names: ``backbone.patch_embed.projection``, ``backbone.layers.i.{ln1, attn.qkv,
attn.proj, ln2, ffn.layers.0.0 (fc1), ffn.layers.1 (fc2)}``, the final norm ``backbone.ln1`` and
the head Linear ``head.layers.head`` (``VisionTransformerClsHead``) or ``head.fc``
(``LinearClsHead``). ``MultiheadAttention`` runs ``scaled_dot_product_attention`` inline, so its
forward is replaced (class swap) by one that routes q, k, v and the softmax through the attention
quantizers; the encoder layer and the backbone get the residual-stream and embedding quantizers
where FQ-ViT places them (``vit_quant.py``: ``qact_embed``, ``qact_pos``, ``qact1``, ``qact2``,
``qact4``).
"""
import torch
from mmpretrain.models.backbones.vision_transformer import TransformerEncoderLayer, VisionTransformer
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.models.utils import MultiheadAttention, resize_pos_embed
from torch import nn

from ..nn.modules import _apply
from .common import Rule, swap_class


class QuantMultiheadAttention(MultiheadAttention):
    """mmpretrain ``MultiheadAttention`` with both matmuls, logits and softmax routed through
    ``self.aq`` (inference: no attention dropout)."""

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x = self.aq.attend(q, k, v, self.head_dims ** -0.5)
        x = x.transpose(1, 2).reshape(B, N, self.embed_dims)
        x = self.out_drop(self.gamma1(self.proj_drop(self.proj(x))))
        if self.v_shortcut:
            x = v.squeeze(1) + x
        return x


class QuantTransformerEncoderLayer(TransformerEncoderLayer):
    """Encoder layer whose two residual sums are quantized where they are formed (FQ-ViT's
    ``qact2`` / ``qact4``); the FFN adds its identity itself, so its output is the second sum."""

    def forward(self, x):
        x = _apply(self.attn_residual_quantizer, x + self.attn(self.ln1(x)))
        return _apply(self.mlp_residual_quantizer, self.ffn(self.ln2(x), identity=x))


class QuantMMPretrainViT(VisionTransformer):
    """``VisionTransformer`` with the embedding quantized as FQ-ViT does: class + patch tokens
    (``embed_tokens``), the position embedding (``pos_embed``) and their sum, the start of the
    residual stream (``residual``)."""

    def forward(self, x):
        B = x.shape[0]
        x, patch_resolution = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        pos_embed = resize_pos_embed(self.pos_embed, self.patch_resolution, patch_resolution,
                                     mode=self.interpolate_mode, num_extra_tokens=self.num_extra_tokens)
        x = _apply(self.embed_tokens_quantizer, x) + _apply(self.pos_embed_quantizer, pos_embed)
        x = self.pre_norm(self.drop_after_pos(_apply(self.residual_quantizer, x)))
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                outs.append(self._format_output(x, patch_resolution))
        return tuple(outs)


def _adapt_attention(mod):
    swap_class(mod, QuantMultiheadAttention)


def _adapt_layer(mod, q):
    mod.attn_residual_quantizer = q['attn_residual']
    mod.mlp_residual_quantizer = q['mlp_residual']
    swap_class(mod, QuantTransformerEncoderLayer)


def _adapt_backbone(mod, q):
    if any(v is not None for v in q.values()):
        if type(mod) is not VisionTransformer:
            raise TypeError(f'the embedding roles (embed_tokens, pos_embed, residual) support '
                            f'mmpretrain VisionTransformer itself, not {type(mod).__name__}: set them to None')
        if not isinstance(mod.pre_norm, nn.Identity) and q['residual'] is not None:
            raise TypeError('the residual role needs a ViT without pre_norm (it would sit between '
                            'the quantized embedding and the first layer): set roles.residual=None')
    mod.embed_tokens_quantizer = q['embed_tokens']
    mod.pos_embed_quantizer = q['pos_embed']
    mod.residual_quantizer = q['residual']
    if type(mod) is VisionTransformer:
        swap_class(mod, QuantMMPretrainViT)


def _join(base, rest):
    return f'{base}.{rest}' if base else rest


def _layer_index(path):
    parts = path.split('.')
    return '.'.join(parts[:-3]), int(parts[-2])  # <backbone>.layers.<i>.<norm>


def _ln1_source(model, path):
    """layers.i.ln1 reads layer i−1's MLP residual sum, or the embedding for layer 0."""
    base, i = _layer_index(path)
    return _join(base, 'residual_quantizer' if i == 0 else f'layers.{i - 1}.mlp_residual_quantizer')


def _ln2_source(model, path):
    return path.rpartition('.')[0] + '.attn_residual_quantizer'


def _final_norm_source(model, path):
    base = path.rpartition('.')[0]
    last = len(model.get_submodule(_join(base, 'layers'))) - 1
    return _join(base, f'layers.{last}.mlp_residual_quantizer')


def _head_input(model, path):
    for head in ('head.layers.head', 'head.fc'):
        try:
            model.get_submodule(head)
        except AttributeError:
            continue
        return f'{head}.in_quantizer'
    return None


def mmpretrain_vit_rules(prefix: str = 'backbone.'):
    """Rules for an ``ImageClassifier`` (``prefix='backbone.'``) whose backbone is an mmpretrain
    ``VisionTransformer``; the classifier head's Linear is quantized like timm's ``head``."""
    p = prefix
    root = prefix[:-1] if prefix.endswith('.') else prefix
    block_norm = dict(input='ln_input', output='ln_output')
    head = dict(weight='head_weight', input='head_input', output='head_output')
    return [
        Rule(root, 'module', dict(embed_tokens='embed_tokens', pos_embed='pos_embed', residual='residual'),
             module_type=VisionTransformer, adapter=_adapt_backbone),
        Rule(f'{p}patch_embed.projection', 'conv', dict(weight='patch_embed_weight', input='patch_embed_input',
                                                        output='patch_embed_output')),
        Rule(f'{p}layers.*', 'module', dict(attn_residual='residual', mlp_residual='residual'),
             module_type=TransformerEncoderLayer, adapter=_adapt_layer),
        Rule(f'{p}layers.*.ln1', 'layernorm', block_norm, feeds=('attn.qkv',), input_from=_ln1_source),
        Rule(f'{p}layers.*.ln2', 'layernorm', block_norm, feeds=('ffn.layers.0.0',), input_from=_ln2_source),
        Rule(f'{p}layers.*.attn.qkv', 'linear', dict(weight='weight', output='qkv_output')),
        Rule(f'{p}layers.*.attn.proj', 'linear', dict(weight='weight', input='proj_input', output='attn_output')),
        Rule(f'{p}layers.*.attn', 'attention', dict(attn_scores=None, rel_pos_bias=None, attn_mask=None),
             attention_adapter=_adapt_attention),
        Rule(f'{p}layers.*.ffn.layers.0.0', 'linear', dict(weight='weight')),
        Rule(f'{p}layers.*.ffn.layers.1', 'linear', dict(weight='weight', input='fc2_input', output='mlp_output')),
        # The final norm (final_norm=True, class-token output) feeds the head; a head-less
        # backbone or an average-pooled one (ln2) keeps its norm's input quantizer only.
        Rule(f'{p}ln1', 'layernorm', dict(input='ln_input'), input_from=_final_norm_source,
             output_to=_head_input, optional=True),
        Rule(f'{p}ln2', 'layernorm', dict(input='ln_input'), optional=True),
        Rule('head.layers.head', 'linear', head, optional=True),
        Rule('head.fc', 'linear', head, optional=True),
    ]


def is_mmpretrain_vit(model) -> bool:
    return isinstance(model, ImageClassifier) and type(model.backbone) is VisionTransformer
