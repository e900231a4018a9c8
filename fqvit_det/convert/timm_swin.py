"""timm SwinTransformer: tensor roles, including relative-position bias, window mask, patch
merging and the residual stream (FQ-ViT ``swin_quant.py`` places its quantizers as these rules
do)."""
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from ..nn.modules import _apply
from .common import Rule, swap_class


def add_window_mask(logits, mask):
    """Add a (num_windows, N, N) shifted-window mask to (B·num_windows, heads, N, N) logits."""
    num_win, n = mask.shape[0], logits.shape[-1]
    heads = logits.shape[1]
    logits = logits.view(-1, num_win, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
    return logits.view(-1, heads, n, n)


class QuantTimmWindowAttention(WindowAttention):
    def forward(self, x, mask=None):
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self.aq.attend(q, k, v, self.scale, bias=self._get_rel_pos_bias(), mask=mask,
                           mask_fn=add_window_mask)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class QuantTimmSwinBlock(SwinTransformerBlock):
    """Swin block whose two residual sums are quantized where they are formed (FQ-ViT)."""

    def forward(self, x):
        B, H, W, C = x.shape
        x = _apply(self.attn_residual_quantizer, x + self.drop_path1(self._attn(self.norm1(x))))
        x = x.reshape(B, -1, C)
        x = _apply(self.mlp_residual_quantizer, x + self.drop_path2(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)


def _adapt(mod):
    swap_class(mod, QuantTimmWindowAttention)


def _adapt_block(mod, q):
    mod.attn_residual_quantizer = q['attn_residual']
    mod.mlp_residual_quantizer = q['mlp_residual']
    swap_class(mod, QuantTimmSwinBlock)


def _has(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _stage_output(model, stage, stages='layers'):
    last = len(model.get_submodule(f'{stages}.{stage}.blocks')) - 1
    return f'{stages}.{stage}.blocks.{last}.mlp_residual_quantizer'


def _norm1_source(model, path):
    """Block j of stage s reads block j−1's MLP residual; block 0 reads the patch merging output
    (the stage's downsample runs first in timm), or for stage 0 the patch-embedding norm output."""
    parts = path.split('.')
    s, j = int(parts[1]), int(parts[3])
    if j > 0:
        return f'layers.{s}.blocks.{j - 1}.mlp_residual_quantizer'
    if _has(model, f'layers.{s}.downsample.reduction'):
        return f'layers.{s}.downsample.reduction.out_quantizer'
    if s > 0:
        return _stage_output(model, s - 1)
    has_norm = isinstance(getattr(model.patch_embed, 'norm', None), nn.LayerNorm)
    return 'patch_embed.norm.out_quantizer' if has_norm else 'patch_embed.proj.out_quantizer'


def _norm2_source(model, path):
    return path.rpartition('.')[0] + '.attn_residual_quantizer'


def _merge_source(model, path):
    return _stage_output(model, int(path.split('.')[1]) - 1)


def _final_source(model, path):
    return _stage_output(model, len(model.layers) - 1)


def swin_rules():
    block_norm = dict(input='ln_input', output='ln_output')
    return [
        Rule('patch_embed.proj', 'conv', dict(weight='patch_embed_weight', input='patch_embed_input',
                                              output='patch_embed_output')),
        Rule('patch_embed.norm', 'layernorm', dict(output='embed_tokens'),
             input_from=lambda m, p: 'patch_embed.proj.out_quantizer', optional=True),
        Rule('layers.*.blocks.*', 'module', dict(attn_residual='residual', mlp_residual='residual'),
             module_type=SwinTransformerBlock, adapter=_adapt_block),
        # timm's PatchMerging concatenates the 2×2 neighbours as channel k·C + c.
        Rule('layers.*.downsample.norm', 'layernorm', block_norm, feeds=('reduction',),
             input_from=_merge_source, input_expand=(4, 'repeat'), optional=True),
        Rule('layers.*.downsample.reduction', 'linear', dict(weight='weight', output='residual'),
             optional=True),
        Rule('layers.*.blocks.*.norm1', 'layernorm', block_norm, feeds=('attn.qkv',), input_from=_norm1_source),
        Rule('layers.*.blocks.*.norm2', 'layernorm', block_norm, feeds=('mlp.fc1',), input_from=_norm2_source),
        Rule('layers.*.blocks.*.attn.qkv', 'linear', dict(weight='weight', output='qkv_output')),
        Rule('layers.*.blocks.*.attn.proj', 'linear', dict(weight='weight', input='proj_input',
                                                            output='attn_output')),
        Rule('layers.*.blocks.*.attn', 'attention', attention_adapter=_adapt),
        Rule('layers.*.blocks.*.mlp.fc1', 'linear', dict(weight='weight')),
        Rule('layers.*.blocks.*.mlp.fc2', 'linear', dict(weight='weight', input='fc2_input',
                                                          output='mlp_output')),
        Rule('norm', 'layernorm', dict(input='ln_input', output='final_ln_output'), input_from=_final_source),
        Rule('head.fc', 'linear', dict(weight='head_weight', input='head_input', output='head_output'),
             optional=True),
    ]


def is_timm_swin(model) -> bool:
    return isinstance(model, SwinTransformer)
