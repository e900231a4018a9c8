#!/usr/bin/env python
"""Convert an official Swin-Transformer-Object-Detection checkpoint (mmdet 2.x) for mmdet 3.x.

    python tools/convert_checkpoint.py cascade_mask_rcnn_swin_small_...pth cascade_swin_s.safetensors

Reads weights only (``torch.load(weights_only=True)``: no pickled code runs; the metadata next to
``state_dict``, such as the training config, is not converted) and writes safetensors atomically. Optionally checks that
the result loads strictly into the detector of a config (``--config``).
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def read_official(path):
    import torch
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ValueError(f'{path}: cannot be read with weights_only=True ({err}); re-save its '
                         '"state_dict" tensors from a trusted environment first') from err
    state = obj.get('state_dict', obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'{path}: expected a dict with a "state_dict" of tensors, got {type(obj).__name__}')
    if not state:
        raise ValueError(f'{path}: the state dict holds no tensors')
    other = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if other:
        raise ValueError(f'{path}: the state dict has non-tensor entries {other[:5]}'
                         f'{" ..." if len(other) > 5 else ""}; expected only weights')
    return state


def write_safetensors(state, out):
    from safetensors.torch import save_file
    directory = osp.dirname(osp.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.tmp', dir=directory)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, out)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', help='official mmdet 2.x Swin detection checkpoint (.pth)')
    p.add_argument('dst', help='output .safetensors for mmdet 3.x / fqvit-det')
    p.add_argument('--config', help='verify: the converted weights must load strictly into this config')
    args = p.parse_args(argv)
    if not args.dst.endswith('.safetensors'):
        raise SystemExit('dst must end with .safetensors')
    from fqvit_det.convert.swin_checkpoint import convert_swin_od_state_dict, looks_like_swin_od
    state = read_official(args.src)
    if looks_like_swin_od(state):
        converted = convert_swin_od_state_dict(state)
    else:  # converting again would rename mmdet 3.x keys a second time (attn.w_msa.w_msa)
        print('note: no backbone.layers.* keys; the checkpoint already looks mmdet 3.x style: '
              'its tensors are written unchanged')
        converted = state
    if args.config:
        from mmengine.config import Config
        from fqvit_det.mm.checkpoint import load_into
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        register_all_modules()
        cfg = Config.fromfile(args.config)
        model = MODELS.build(cfg.model)
        load_into(model, converted, args.src)
        print(f'verified: loads strictly into {args.config}')
    write_safetensors(converted, args.dst)
    print(f'wrote {len(converted)} tensors to {args.dst}')


if __name__ == '__main__':
    main()
