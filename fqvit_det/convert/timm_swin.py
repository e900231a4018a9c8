"""timm SwinTransformer: tensor roles, including relative-position bias, window mask, patch merging."""
from timm.models.swin_transformer import SwinTransformer, WindowAttention

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


def _adapt(mod):
    swap_class(mod, QuantTimmWindowAttention)


def swin_rules():
    block_norm = dict(input='ln_input', output='ln_output')
    return [
        Rule('patch_embed.proj', 'conv', dict(weight='patch_embed_weight', input='patch_embed_input')),
        Rule('layers.*.downsample.norm', 'layernorm', block_norm, feeds=('reduction',)),
        Rule('layers.*.downsample.reduction', 'linear', dict(weight='weight')),
        Rule('layers.*.blocks.*.norm1', 'layernorm', block_norm, feeds=('attn.qkv',)),
        Rule('layers.*.blocks.*.norm2', 'layernorm', block_norm, feeds=('mlp.fc1',)),
        Rule('layers.*.blocks.*.attn.qkv', 'linear', dict(weight='weight')),
        Rule('layers.*.blocks.*.attn.proj', 'linear', dict(weight='weight', input='proj_input')),
        Rule('layers.*.blocks.*.attn', 'attention', attention_adapter=_adapt),
        Rule('layers.*.blocks.*.mlp.fc1', 'linear', dict(weight='weight')),
        Rule('layers.*.blocks.*.mlp.fc2', 'linear', dict(weight='weight', input='fc2_input')),
        Rule('norm', 'layernorm', dict(input='ln_input')),
        Rule('head.fc', 'linear', dict(weight='head_weight', input='head_input')),
    ]


def is_timm_swin(model) -> bool:
    return isinstance(model, SwinTransformer)
