"""Official Swin-Transformer-Object-Detection layout → mmdet 3.x: semantics and strict loading."""
import torch
from torch import nn

from fqvit_det.convert.swin_checkpoint import convert_swin_od_state_dict


class OfficialPatchMerging(nn.Module):
    """The official layout: concatenate the 2×2 neighbours as x(0,0), x(1,0), x(0,1), x(1,1)."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, h, w):
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


def test_patch_merging_reorder_is_exact():
    from mmdet.models.layers import PatchMerging
    torch.manual_seed(0)
    dim = 8
    official = OfficialPatchMerging(dim)
    with torch.no_grad():
        official.norm.weight.normal_()
        official.norm.bias.normal_()
    ours = PatchMerging(dim, 2 * dim)
    state = {f'backbone.layers.0.downsample.{k}': v for k, v in official.state_dict().items()}
    converted = convert_swin_od_state_dict(state)
    ours.load_state_dict({k.split('downsample.')[1]: v for k, v in converted.items()}, strict=True)
    x = torch.randn(2, 6 * 4, dim)
    y_official = official(x, 6, 4)
    y_ours, _ = ours(x, (6, 4))
    torch.testing.assert_close(y_ours, y_official, rtol=1e-5, atol=1e-5)


def _official_keys(mm_state):
    """Write an mmdet 3.x Swin state in the official key layout (independent inverse mapping)."""
    out = {}
    for k, v in mm_state.items():
        k2 = k.replace('stages.', 'layers.').replace('attn.w_msa.', 'attn.')
        k2 = k2.replace('ffn.layers.0.0.', 'mlp.fc1.').replace('ffn.layers.1.', 'mlp.fc2.')
        k2 = k2.replace('patch_embed.projection.', 'patch_embed.proj.')
        if 'downsample.reduction.weight' in k or 'downsample.norm.' in k:
            c4 = v.shape[-1]  # unfold order (c·4 + p) → concat order (k·C + c), k = [0, 2, 1, 3][p]
            v = v.reshape(*v.shape[:-1], c4 // 4, 4)[..., [0, 2, 1, 3]].transpose(-1, -2).reshape(v.shape)
        out['backbone.' + k2] = v
    return out


def test_whole_detector_checkpoint_loads_strictly_after_conversion():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    torch.manual_seed(0)
    swin = dict(type='SwinTransformer', embed_dims=32, depths=[1, 2], num_heads=[1, 2], window_size=7,
                out_indices=(0, 1), convert_weights=False)
    backbone = MODELS.build(swin)
    official = _official_keys(backbone.state_dict())
    official['neck.lateral_convs.0.conv.weight'] = torch.randn(4, 32, 1, 1)  # non-backbone passes through
    assert any('.mlp.fc1.' in k for k in official) and any('layers.0.downsample' in k for k in official)
    converted = convert_swin_od_state_dict(official)
    assert converted['neck.lateral_convs.0.conv.weight'] is official['neck.lateral_convs.0.conv.weight']
    fresh = MODELS.build(swin)
    fresh.load_state_dict({k[len('backbone.'):]: v for k, v in converted.items()
                           if k.startswith('backbone.')}, strict=True)
    for k, v in backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
