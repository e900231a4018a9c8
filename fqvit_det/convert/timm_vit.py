"""timm VisionTransformer (DeiT / ViT): tensor roles, and the quantized attention, block and
embedding (FQ-ViT ``vit_quant.py`` places its quantizers as these rules do)."""
import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..nn.modules import _apply
from .common import Rule, swap_class


class QuantTimmAttention(Attention):
    """timm ``Attention`` with both matmuls, logits and softmax routed through ``self.aq``."""

    def forward(self, x, attn_mask=None, is_causal=False):
        if is_causal:
            raise NotImplementedError('causal attention is not used by ViT classifiers')
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, 'gate', None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.aq.attend(q, k, v, self.scale, mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantTimmBlock(Block):
    """timm ``Block`` whose two residual sums are quantized where they are formed (FQ-ViT's
    ``qact2`` / ``qact4``): the quantized sum is both the next residual operand and the input of
    the next LayerNorm, which reads it without quantizing again."""

    def forward(self, x, attn_mask=None, is_causal=False):
        attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = _apply(self.attn_residual_quantizer, x + self.drop_path1(self.ls1(attn)))
        x = _apply(self.mlp_residual_quantizer, x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))
        return x


class QuantTimmVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with the embedding quantized as FQ-ViT does: the tokens entering
    the position embedding (``qact_embed``), the position embedding (``qact_pos``) and their sum,
    the start of the residual stream (``qact1``)."""

    def _pos_embed(self, x):
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.pos_embed is None:
            x = torch.cat(to_cat + [x.view(x.shape[0], -1, x.shape[-1])], dim=1)
            return _apply(self.residual_quantizer, _apply(self.embed_tokens_quantizer, x))
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            pos_embed = resample_abs_pos_embed(
                self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
            x = x.view(B, -1, C)
        else:
            pos_embed = self.pos_embed
        pos_embed = _apply(self.pos_embed_quantizer, pos_embed)
        if self.no_embed_class:
            x = _apply(self.embed_tokens_quantizer, x) + pos_embed
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
            x = _apply(self.embed_tokens_quantizer, x) + pos_embed
        return self.pos_drop(_apply(self.residual_quantizer, x))


def _adapt(mod):
    swap_class(mod, QuantTimmAttention)


def _adapt_block(mod, q):
    mod.attn_residual_quantizer = q['attn_residual']
    mod.mlp_residual_quantizer = q['mlp_residual']
    swap_class(mod, QuantTimmBlock)


def _adapt_model(mod, q):
    if any(v is not None for v in q.values()):
        if type(mod) is not VisionTransformer:
            raise TypeError(f'the embedding roles (embed_tokens, pos_embed, residual) support timm '
                            f'VisionTransformer itself, not {type(mod).__name__}: set them to None')
        if not isinstance(mod.norm_pre, nn.Identity) and q['residual'] is not None:
            raise TypeError('the residual role needs a ViT without norm_pre (it would sit between '
                            'the quantized embedding and the first block): set roles.residual=None')
    mod.embed_tokens_quantizer = q['embed_tokens']
    mod.pos_embed_quantizer = q['pos_embed']
    mod.residual_quantizer = q['residual']
    if type(mod) is VisionTransformer:
        swap_class(mod, QuantTimmVisionTransformer)


def _join(base, rest):
    return f'{base}.{rest}' if base else rest


def _norm1_source(model, path):
    """blocks.i.norm1 reads block i−1's MLP residual sum, or the embedding for block 0."""
    parts = path.split('.')
    base, i = '.'.join(parts[:-3]), int(parts[-2])
    if i == 0:
        return _join(base, 'residual_quantizer')
    return _join(base, f'blocks.{i - 1}.mlp_residual_quantizer')


def _norm2_source(model, path):
    """norm2 reads its own block's attention residual sum."""
    return path.rpartition('.')[0] + '.attn_residual_quantizer'


def _final_norm_source(model, path):
    base = path.rpartition('.')[0]
    last = len(model.get_submodule(_join(base, 'blocks'))) - 1
    return _join(base, f'blocks.{last}.mlp_residual_quantizer')


def _head_input(model, path):
    return _join(path.rpartition('.')[0], 'head.in_quantizer')


def vit_rules(prefix: str = ''):
    p = prefix
    root = prefix[:-1] if prefix.endswith('.') else prefix
    block_norm = dict(input='ln_input', output='ln_output')
    return [
        Rule(root, 'module', dict(embed_tokens='embed_tokens', pos_embed='pos_embed', residual='residual'),
             module_type=VisionTransformer, adapter=_adapt_model),
        Rule(f'{p}patch_embed.proj', 'conv', dict(weight='patch_embed_weight', input='patch_embed_input',
                                                  output='patch_embed_output')),
        Rule(f'{p}blocks.*', 'module', dict(attn_residual='residual', mlp_residual='residual'),
             module_type=Block, adapter=_adapt_block),
        Rule(f'{p}blocks.*.norm1', 'layernorm', block_norm, feeds=('attn.qkv',), input_from=_norm1_source),
        Rule(f'{p}blocks.*.norm2', 'layernorm', block_norm, feeds=('mlp.fc1',), input_from=_norm2_source),
        Rule(f'{p}blocks.*.attn.qkv', 'linear', dict(weight='weight', output='qkv_output')),
        Rule(f'{p}blocks.*.attn.proj', 'linear', dict(weight='weight', input='proj_input', output='attn_output')),
        Rule(f'{p}blocks.*.attn', 'attention', dict(attn_scores=None, rel_pos_bias=None, attn_mask=None),
             attention_adapter=_adapt),
        Rule(f'{p}blocks.*.mlp.fc1', 'linear', dict(weight='weight')),
        Rule(f'{p}blocks.*.mlp.fc2', 'linear', dict(weight='weight', input='fc2_input', output='mlp_output')),
        # ``norm`` (class-token models) or ``fc_norm`` (average-pooled models): one is Identity.
        Rule(f'{p}norm', 'layernorm', dict(input='ln_input'), input_from=_final_norm_source,
             output_to=_head_input, optional=True),
        Rule(f'{p}fc_norm', 'layernorm', dict(input='ln_input'), optional=True),
        # Backbones (num_classes=0) have no head.
        Rule(f'{p}head', 'linear', dict(weight='head_weight', input='head_input', output='head_output'),
             optional=True),
    ]


def is_timm_vit(model) -> bool:
    return isinstance(model, VisionTransformer)
