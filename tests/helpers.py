"""Small models and data shared by the integration tests."""
import os
import os.path as osp

import timm
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATA = os.environ.get('FQVIT_DATA', osp.join(ROOT, '..', 'shared', 'data'))
HAS_DATA = osp.isdir(osp.join(DATA, 'imagenet')) and osp.isdir(osp.join(DATA, 'deit_tiny'))
HAS_COCO = osp.isdir(osp.join(DATA, 'coco_mini'))


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=2, img_size=64,
                              num_classes=10).eval()
    # timm initialises the class token and position embedding with std 0.02, ~100x smaller than
    # the patch tokens, so quantizing the residual stream per tensor erases the token the head
    # reads: an artifact of random weights (trained models carry real scales), removed here.
    with torch.no_grad():
        model.cls_token.normal_(std=0.5)
        model.pos_embed.normal_(std=0.5)
    return model


def tiny_swin(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, depths=(1, 1, 1, 1),
                             embed_dim=32, num_heads=(1, 2, 2, 4), num_classes=10).eval()


def images(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = model.patch_embed.img_size
    return torch.randn(n, 3, h, w, generator=g)
