"""Role mixes with dynamic quantizers (issue 11 §2), shared by benchmarks/vit_block_sqnr.py and
benchmarks/cls_fidelity.py. Each entry: name -> function(bits, image_norm) -> quant_cfg, where
``image_norm`` = (mean, std) of the input normalization in pixel units (mmdet vs timm differ).
"""
MMDET_NORM = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
TIMM_NORM = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))


def dyn(bits, **kw):
    return dict(type='DynamicQuantizer', bits=bits, **kw)


def probs(bits, grid='uniform'):
    return dict(type='DynamicSoftmaxQuantizer', bits=bits, grid=grid)


def pixels(norm):
    return dict(type='PixelInputQuantizer', mean=list(norm[0]), std=list(norm[1]))


def sym_channel_weights(bits):
    return dict(type='UniformQuantizer', bits=bits, symmetric=True, ch_axis=0)


def _tokens(bits, group=None):
    """Dynamic per-token (or per-group) activations where a Linear reads them, q/k per token
    (Q·Kᵀ stays integer: one scale per row of q and of k), v per channel over the tokens
    (P·V stays integer)."""
    act = dyn(bits, granularity='group', group_size=group) if group else dyn(bits)
    return dict(ln_output=act, proj_input=act, fc2_input=act, head_input=act,
                q=dyn(bits), k=dyn(bits), v=dyn(bits, dim=-2))


def mix(base, bits, norm, tokens=True, row_probs=True, pixel=True, group=None, weights=None,
        probs_bits=None, probs_grid='uniform', **extra):
    roles = {}
    if tokens:
        roles.update(_tokens(bits, group))
    if row_probs:
        roles['attn_probs'] = probs(probs_bits or bits, probs_grid)
    if pixel:
        roles['patch_embed_input'] = pixels(norm)
    if weights == 'sym_channel':
        roles.update(weight=sym_channel_weights(bits), patch_embed_weight=sym_channel_weights(bits))
    elif weights == 'gptq' or weights == 'gptq_rs':   # Hessian-compensated (benchmarks: merged gptq branch)
        g = dict(type='GPTQWeightQuantizer', bits=bits, act_order=True, range_search=weights == 'gptq_rs')
        roles.update(weight=g, patch_embed_weight=g)
    elif weights is not None:   # Linear weights (N, K); the patch-embedding conv keeps the preset's
        roles.update(weight=weights)
    cfg = dict(method=base, w_bits=bits, a_bits=bits, roles=roles, **extra)
    if base in ('repq', 'adalog') and tokens:
        cfg['reparam'] = False   # RepQ-ViT's reparameterization needs a static per-channel ln_output
    return cfg


MIXES = {
    # faithful presets
    'repq': lambda b, n: dict(method='repq', w_bits=b, a_bits=b),
    'fqvit_ptf_lis': lambda b, n: dict(method='fqvit', w_bits=b, a_bits=b, attn_bits=4 if b == 8 else b),
    # one piece at a time on RepQ-ViT
    'repq+pixel': lambda b, n: mix('repq', b, n, tokens=False, row_probs=False),
    'repq+rowprobs': lambda b, n: mix('repq', b, n, tokens=False, pixel=False),
    'repq+tokens': lambda b, n: mix('repq', b, n, row_probs=False, pixel=False),
    'repq+tokens+rowprobs': lambda b, n: mix('repq', b, n, pixel=False),
    # everything: dynamic tokens + per-row probabilities + exact pixels
    'dyn': lambda b, n: mix('repq', b, n),
    'dyn_g32': lambda b, n: mix('repq', b, n, group=32),
    'dyn_symw': lambda b, n: mix('repq', b, n, weights='sym_channel'),
    'dyn_g32_symw': lambda b, n: mix('repq', b, n, group=32, weights='sym_channel'),
    'dyn_g32_probs8': lambda b, n: mix('repq', b, n, group=32, probs_bits=8),
    'dyn_probs8': lambda b, n: mix('repq', b, n, probs_bits=8),
    # weights as groups of 32 input channels (dynamic = MinMax on the weight itself)
    'dyn_g32_wg32': lambda b, n: mix('repq', b, n, group=32, weights=dyn(b, granularity='group', group_size=32, symmetric=True)),
    'dyn_g32_wg32_probs8': lambda b, n: mix('repq', b, n, group=32, probs_bits=8, weights=dyn(b, granularity='group', group_size=32, symmetric=True)),
    'dyn_g32_rowlog': lambda b, n: mix('repq', b, n, group=32, probs_grid='log_sqrt2'),
    'dyn_g32_rowlog2': lambda b, n: mix('repq', b, n, group=32, probs_grid='log2'),
    'dyn_g32_staticprobs': lambda b, n: mix('repq', b, n, group=32, row_probs=False),
    'dyn_g32_wg32_rowlog': lambda b, n: mix('repq', b, n, group=32, probs_grid='log_sqrt2', weights=dyn(b, granularity='group', group_size=32, symmetric=True)),
    'dyn_g32_rowlog_gptq': lambda b, n: mix('repq', b, n, group=32, probs_grid='log_sqrt2', weights='gptq'),
    'dyn_g32_rowlog_gptq_rs': lambda b, n: mix('repq', b, n, group=32, probs_grid='log_sqrt2', weights='gptq_rs'),
    'dyn_rowlog_gptq': lambda b, n: mix('repq', b, n, probs_grid='log_sqrt2', weights='gptq'),
    # diagnosis: the weights alone (every activation float) and the activations alone
    'weights_only': lambda b, n: dict(method='repq', w_bits=b, a_bits=b, reparam=False, roles={
        r: None for r in ('patch_embed_input', 'ln_output', 'q', 'k', 'v', 'attn_probs', 'proj_input',
                          'fc2_input', 'head_input', 'det_input')}),
    'dyn_g32_rowlog_wfloat': lambda b, n: mix('repq', b, n, group=32, probs_grid='log_sqrt2', weights=None,
                                              **{}) | {'roles': dict(mix('repq', b, n, group=32, probs_grid='log_sqrt2')['roles'],
                                                                       weight=None, patch_embed_weight=None)},
}
