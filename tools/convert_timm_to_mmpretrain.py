#!/usr/bin/env python
"""Rename a timm ViT / DeiT checkpoint to mmpretrain ``ImageClassifier`` keys (or back).

    python tools/convert_timm_to_mmpretrain.py ../shared/data/deit_tiny/deit_tiny_patch16_224.safetensors \
        work_dirs/deit-tiny_mmpretrain.safetensors [--config configs/cls/mmpretrain_deit_tiny_w8a8a4.py]
    python tools/convert_timm_to_mmpretrain.py mmpretrain.safetensors timm.safetensors --reverse

Reads safetensors or a weights-only ``.pth`` (no pickled code runs) and writes safetensors
atomically. Only key names change (``fqvit_det.convert.timm_to_mmpretrain``). ``--config``
checks that the result loads strictly into the classifier of an mmpretrain config.
QuantizedClassifier also converts timm DeiT/ViT weights on the fly, so this tool is for users who
want an mmpretrain-native file.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # convert_checkpoint's writer


def build_classifier(config):
    """The float mmpretrain classifier of ``config`` (a QuantizedClassifier's inner one)."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(config)
    model = cfg.model
    if model.get('type') == 'QuantizedClassifier':
        model = model.classifier
    return MODELS.build(model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', help='timm ViT/DeiT weights (.safetensors or .pth)')
    p.add_argument('dst', help='output .safetensors')
    p.add_argument('--reverse', action='store_true', help='mmpretrain keys → timm keys')
    p.add_argument('--config', help='verify: the result must load strictly into this mmpretrain config')
    args = p.parse_args(argv)
    if not args.dst.endswith('.safetensors'):
        raise SystemExit('dst must end with .safetensors')
    from convert_checkpoint import write_safetensors
    from fqvit_det.convert.timm_to_mmpretrain import mmpretrain_vit_to_timm, timm_vit_to_mmpretrain
    from fqvit_det.mm.checkpoint import load_into, load_weights
    state = load_weights(args.src)
    converted = mmpretrain_vit_to_timm(state) if args.reverse else timm_vit_to_mmpretrain(state)
    if args.config:
        if args.reverse:
            raise SystemExit('--config checks mmpretrain weights; it does not apply with --reverse')
        load_into(build_classifier(args.config), converted, args.src)
        print(f'verified: loads strictly into {args.config}')
    write_safetensors(converted, args.dst)
    print(f'wrote {len(converted)} tensors to {args.dst}')


if __name__ == '__main__':
    main()
