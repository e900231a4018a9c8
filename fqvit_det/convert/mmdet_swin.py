"""mmdet 3.x ``SwinTransformer`` backbone: the same tensor roles as timm Swin.

``WindowMSA`` computes QKᵀ and P·V inline, so its forward is replaced (class swap) by one that
routes q, k, v, the relative-position bias, the shifted-window mask and the softmax through the
attention quantizers. ``PatchMerging`` (nn.Unfold + LayerNorm + Linear) maps to LayerNorm/Linear
rules; the FFN's fc1/fc2 live at ``ffn.layers.0.0`` / ``ffn.layers.1``.
"""
from mmdet.models.backbones.swin import SwinTransformer, WindowMSA

from .common import Rule, swap_class
from .timm_swin import add_window_mask


class QuantWindowMSA(WindowMSA):
    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        area = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(area, area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        x = self.aq.attend(q, k, v, self.scale, bias=bias, mask=mask, mask_fn=add_window_mask)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def _adapt(mod):
    swap_class(mod, QuantWindowMSA)


def mmdet_swin_rules(prefix: str = 'backbone.'):
    p = prefix
    block_norm = dict(input='ln_input', output='ln_output')
    return [
        Rule(f'{p}patch_embed.projection', 'conv', dict(weight='patch_embed_weight', input='patch_embed_input')),
        Rule(f'{p}stages.*.downsample.norm', 'layernorm', block_norm, feeds=('reduction',)),
        Rule(f'{p}stages.*.downsample.reduction', 'linear', dict(weight='weight')),
        Rule(f'{p}stages.*.blocks.*.norm1', 'layernorm', block_norm, feeds=('attn.w_msa.qkv',)),
        Rule(f'{p}stages.*.blocks.*.norm2', 'layernorm', block_norm, feeds=('ffn.layers.0.0',)),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa.qkv', 'linear', dict(weight='weight')),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa.proj', 'linear', dict(weight='weight', input='proj_input')),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa', 'attention', attention_adapter=_adapt),
        Rule(f'{p}stages.*.blocks.*.ffn.layers.0.0', 'linear', dict(weight='weight')),
        Rule(f'{p}stages.*.blocks.*.ffn.layers.1', 'linear', dict(weight='weight', input='fc2_input')),
        # Output norms feed the neck, whose conv inputs are quantized by the detection rules.
        Rule(f'{p}norm?', 'layernorm', dict(input='ln_input')),
    ]


def is_mmdet_swin(backbone) -> bool:
    return isinstance(backbone, SwinTransformer)
