"""What mmdet's and mmpretrain's Swin (``SwinTransformer`` / ``SwinBlock`` / ``WindowMSA``, the same
OpenMMLab design under two packages) share: the quantized forwards, as mixins the two converters
put before each package's own class, and the rule list. No mm* import here.
"""
from ..nn.modules import _apply
from .common import Rule, swap_class
from .timm_swin import add_window_mask


class QuantWindowMSAMixin:
    """``WindowMSA.forward`` with q, k, v, the relative-position bias, the shifted-window mask and
    the softmax routed through the attention quantizers (``self.aq``)."""

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


class QuantSwinBlockMixin:
    """``SwinBlock.forward`` with the two residual sums quantized where they are formed (FQ-ViT);
    the FFN adds its identity itself, so its output is the second sum (inference: no checkpointing)."""

    def forward(self, x, hw_shape):
        x = _apply(self.attn_residual_quantizer, x + self.attn(self.norm1(x), hw_shape))
        return _apply(self.mlp_residual_quantizer, self.ffn(self.norm2(x), identity=x))


def openmmlab_swin_rules(p: str, block_type: type, quant_block: type, quant_attention: type):
    """Rules for the patch embedding, the blocks and the patch merging of an OpenMMLab Swin under
    prefix ``p`` (``quant_block`` / ``quant_attention``: the package's classes with the mixins
    above); the callers add their output norms and heads."""
    def adapt_block(mod, q):
        mod.attn_residual_quantizer = q['attn_residual']
        mod.mlp_residual_quantizer = q['mlp_residual']
        swap_class(mod, quant_block)

    block_norm = dict(input='ln_input', output='ln_output')
    norm1, norm2, merge, _ = openmmlab_swin_norm_sources(p)
    return [
        Rule(f'{p}patch_embed.projection', 'conv', dict(weight='patch_embed_weight', input='patch_embed_input',
                                                        output='patch_embed_output')),
        Rule(f'{p}patch_embed.norm', 'layernorm', dict(output='embed_tokens'),
             input_from=lambda m, path: f'{p}patch_embed.projection.out_quantizer', optional=True),
        Rule(f'{p}stages.*.blocks.*', 'module', dict(attn_residual='residual', mlp_residual='residual'),
             module_type=block_type, adapter=adapt_block),
        # PatchMerging (nn.Unfold) lays the 2×2 neighbours out as channel c·4 + p.
        Rule(f'{p}stages.*.downsample.norm', 'layernorm', block_norm, feeds=('reduction',),
             input_from=merge, input_expand=(4, 'interleave')),
        Rule(f'{p}stages.*.downsample.reduction', 'linear', dict(weight='weight', output='residual')),
        Rule(f'{p}stages.*.blocks.*.norm1', 'layernorm', block_norm, feeds=('attn.w_msa.qkv',), input_from=norm1),
        Rule(f'{p}stages.*.blocks.*.norm2', 'layernorm', block_norm, feeds=('ffn.layers.0.0',), input_from=norm2),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa.qkv', 'linear', dict(weight='weight', output='qkv_output')),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa.proj', 'linear', dict(weight='weight', input='proj_input',
                                                                      output='attn_output')),
        Rule(f'{p}stages.*.blocks.*.attn.w_msa', 'attention',
             attention_adapter=lambda mod: swap_class(mod, quant_attention)),
        Rule(f'{p}stages.*.blocks.*.ffn.layers.0.0', 'linear', dict(weight='weight')),
        Rule(f'{p}stages.*.blocks.*.ffn.layers.1', 'linear', dict(weight='weight', input='fc2_input',
                                                                  output='mlp_output')),
    ]


def _swin_stage_output(model, p, stage):
    last = len(model.get_submodule(f'{p}stages.{stage}.blocks')) - 1
    return f'{p}stages.{stage}.blocks.{last}.mlp_residual_quantizer'


def openmmlab_swin_norm_sources(p):
    """Input sources (``Rule.input_from``) of the norms of an OpenMMLab Swin (mmdet's, and
    mmpretrain's with ``out_after_downsample=False``) under prefix ``p``: a stage's blocks run,
    then its output norm, then its downsample. Returns ``(norm1, norm2, merge, out_norm)``."""
    def norm1(model, path):
        parts = path[len(p):].split('.')
        s, j = int(parts[1]), int(parts[3])
        if j > 0:
            return f'{p}stages.{s}.blocks.{j - 1}.mlp_residual_quantizer'
        if s > 0:
            return f'{p}stages.{s - 1}.downsample.reduction.out_quantizer'
        return f'{p}patch_embed.norm.out_quantizer'

    def norm2(model, path):
        return path.rpartition('.')[0] + '.attn_residual_quantizer'

    def merge(model, path):
        return _swin_stage_output(model, p, int(path[len(p):].split('.')[1]))

    def out_norm(model, path):
        return _swin_stage_output(model, p, int(path[len(p):][len('norm'):]))

    return norm1, norm2, merge, out_norm
