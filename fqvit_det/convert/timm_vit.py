"""timm VisionTransformer (DeiT / ViT): tensor roles and the quantized attention forward."""
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer

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


def _adapt(mod):
    swap_class(mod, QuantTimmAttention)


def vit_rules(prefix: str = ''):
    block_norm = dict(input='ln_input', output='ln_output')
    rules = [
        Rule('patch_embed.proj', 'conv', dict(weight='patch_embed_weight', input='patch_embed_input')),
        Rule('blocks.*.norm1', 'layernorm', block_norm, feeds=('attn.qkv',)),
        Rule('blocks.*.norm2', 'layernorm', block_norm, feeds=('mlp.fc1',)),
        Rule('blocks.*.attn.qkv', 'linear', dict(weight='weight')),
        Rule('blocks.*.attn.proj', 'linear', dict(weight='weight', input='proj_input')),
        Rule('blocks.*.attn', 'attention', dict(rel_pos_bias=None, attn_mask=None), attention_adapter=_adapt),
        Rule('blocks.*.mlp.fc1', 'linear', dict(weight='weight')),
        Rule('blocks.*.mlp.fc2', 'linear', dict(weight='weight', input='fc2_input')),
        Rule('norm', 'layernorm', dict(input='ln_input')),
        Rule('fc_norm', 'layernorm', dict(input='ln_input')),
        Rule('head', 'linear', dict(weight='head_weight', input='head_input')),
    ]
    for r in rules:
        r.pattern = prefix + r.pattern
    return rules


def is_timm_vit(model) -> bool:
    return isinstance(model, VisionTransformer)
