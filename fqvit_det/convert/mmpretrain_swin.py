"""mmpretrain ``ImageClassifier`` with a ``SwinTransformer`` backbone: the same tensor roles as
timm's Swin (``timm_swin.py``), on mmpretrain's module names (close to mmdet's Swin,
``mmdet_swin.py``).

``ShiftWindowMSA`` pads, shifts and partitions windows and calls its ``WindowMSA`` (``w_msa``),
which computes QKᵀ and P·V inline: ``WindowMSA``'s forward is replaced (class swap) by one that
routes q, k, v, the relative-position bias, the shifted-window mask and the softmax through the
attention quantizers. ``PatchMerging`` (nn.Unfold + LayerNorm + Linear) maps to LayerNorm/Linear
rules; the FFN's fc1/fc2 live at ``ffn.layers.0.0`` / ``ffn.layers.1``. The classifier pools the
output norm (``backbone.norm3``) globally and feeds ``head.fc``.
"""
from mmpretrain.models.backbones.swin_transformer import SwinBlock, SwinTransformer
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.models.utils.attention import WindowMSA

from ..nn.modules import _apply
from .common import Rule, openmmlab_swin_norm_sources, swap_class
from .timm_swin import add_window_mask


class QuantMMPretrainWindowMSA(WindowMSA):
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


class QuantMMPretrainSwinBlock(SwinBlock):
    """``SwinBlock`` whose two residual sums are quantized where they are formed (FQ-ViT); the FFN
    adds its identity itself, so its output is the second sum (inference: no checkpointing)."""

    def forward(self, x, hw_shape):
        x = _apply(self.attn_residual_quantizer, x + self.attn(self.norm1(x), hw_shape))
        return _apply(self.mlp_residual_quantizer, self.ffn(self.norm2(x), identity=x))


def _adapt_attention(mod):
    swap_class(mod, QuantMMPretrainWindowMSA)


def _adapt_block(mod, q):
    mod.attn_residual_quantizer = q['attn_residual']
    mod.mlp_residual_quantizer = q['mlp_residual']
    swap_class(mod, QuantMMPretrainSwinBlock)


def mmpretrain_swin_rules(prefix: str = 'backbone.'):
    p = prefix
    block_norm = dict(input='ln_input', output='ln_output')
    norm1, norm2, merge, out_norm = openmmlab_swin_norm_sources(p)
    return [
        Rule(f'{p}patch_embed.projection', 'conv', dict(weight='patch_embed_weight', input='patch_embed_input',
                                                        output='patch_embed_output')),
        Rule(f'{p}patch_embed.norm', 'layernorm', dict(output='embed_tokens'),
             input_from=lambda m, path: f'{p}patch_embed.projection.out_quantizer', optional=True),
        Rule(f'{p}stages.*.blocks.*', 'module', dict(attn_residual='residual', mlp_residual='residual'),
             module_type=SwinBlock, adapter=_adapt_block),
        # mmpretrain's PatchMerging unfolds the 2×2 neighbours as channel c·4 + p.
        Rule(f'{p}stages.*.downsample.norm', 'layernorm', block_norm, feeds=('reduction',),
             input_from=merge, input_expand=(4, 'interleave')),
        Rule(f'{p}stages.*.downsample.reduction', 'linear', dict(weight='weight', output='residual')),
        Rule(f'{p}stages.*.blocks.*.norm1', 'layernorm', block_norm, feeds=('attn.w_msa.qkv',), input_from=norm1),
        Rule(f'{p}stages.*.blocks.*.norm2', 'layernorm', block_norm, feeds=('ffn.layers.0.0',), input_from=norm2),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa.qkv', 'linear', dict(weight='weight', output='qkv_output')),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa.proj', 'linear', dict(weight='weight', input='proj_input',
                                                                      output='attn_output')),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa', 'attention', attention_adapter=_adapt_attention),
        Rule(f'{p}stages.*.blocks.*.ffn.layers.0.0', 'linear', dict(weight='weight')),
        Rule(f'{p}stages.*.blocks.*.ffn.layers.1', 'linear', dict(weight='weight', input='fc2_input',
                                                                  output='mlp_output')),
        # The classifier's output norm (timm's ``norm``), before global average pooling.
        Rule(f'{p}norm?', 'layernorm', dict(input='ln_input', output='final_ln_output'), input_from=out_norm),
        Rule('head.fc', 'linear', dict(weight='head_weight', input='head_input', output='head_output'),
             optional=True),
    ]


def is_mmpretrain_swin(model) -> bool:
    return isinstance(model, ImageClassifier) and isinstance(model.backbone, SwinTransformer)
