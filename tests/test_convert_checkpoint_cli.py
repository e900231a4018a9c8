"""tools/convert_checkpoint.py on a tiny synthetic detector: round trip, verification, bad input."""
import argparse
import os.path as osp
import subprocess
import sys

import pytest
import torch

from .test_swin_checkpoint import _official_keys
from .tiny_cls import ROOT, load_tool

TINY_DET = """
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(_delete_=True, type='SwinTransformer', embed_dims=32, depths=[1, 2], num_heads=[1, 2],
                  window_size=7, out_indices=(0, 1), convert_weights=False, init_cfg=None),
    neck=dict(in_channels=[32, 64], start_level=0, out_channels=16),
    bbox_head=dict(num_classes=2, in_channels=16, feat_channels=16, stacked_convs=1))
"""


@pytest.fixture(scope='module')
def tiny_detector(tmp_path_factory):
    """(config path, mmdet 3.x state of the built detector, official-layout .pth path)."""
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    root = tmp_path_factory.mktemp('convert')
    cfg_path = str(root / 'tiny_det.py')
    with open(cfg_path, 'w') as f:
        f.write(TINY_DET)
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(cfg_path).model)
    with torch.no_grad():  # non-trivial norms, so a wrong channel order cannot pass unnoticed
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    official = _official_keys({k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')})
    official.update({k: v for k, v in state.items() if not k.startswith('backbone.')})
    src = str(root / 'official.pth')
    # The official files carry a meta dict (plain values) next to the weights.
    torch.save({'state_dict': official, 'meta': {'epoch': 36, 'mmdet_version': '2.11.0'}}, src)
    return cfg_path, state, src


def test_cli_converts_verifies_and_round_trips(tiny_detector, tmp_path):
    from safetensors.torch import load_file
    cfg_path, state, src = tiny_detector
    dst = str(tmp_path / 'out' / 'converted.safetensors')
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'convert_checkpoint.py'), src, dst,
                           '--config', cfg_path], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__('os').environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f'verified: loads strictly into {cfg_path}' in proc.stdout
    assert f'wrote {len(state)} tensors to {dst}' in proc.stdout
    converted = load_file(dst)
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


def test_mismatching_config_is_refused_and_nothing_written(tiny_detector, tmp_path):
    cfg_path, _, src = tiny_detector
    other = str(tmp_path / 'wider.py')
    with open(other, 'w') as f:
        f.write(TINY_DET.replace('embed_dims=32', 'embed_dims=48').replace('in_channels=[32, 64]',
                                                                           'in_channels=[48, 96]'))
    dst = str(tmp_path / 'x.safetensors')
    with pytest.raises(ValueError, match=r'official.pth does not match the model.*shape mismatches'):
        load_tool('convert_checkpoint').main([src, dst, '--config', other])
    assert not osp.exists(dst)


def test_already_converted_checkpoint_passes_through_with_a_note(tiny_detector, tmp_path, capsys):
    from safetensors.torch import load_file
    _, state, _ = tiny_detector
    src = str(tmp_path / 'mmdet3.pth')
    torch.save({'state_dict': state}, src)
    dst = str(tmp_path / 'same.safetensors')
    load_tool('convert_checkpoint').main([src, dst])
    assert 'already looks mmdet 3.x style' in capsys.readouterr().out
    converted = load_file(dst)
    assert set(converted) == set(state) and all(torch.equal(converted[k], v) for k, v in state.items())


def test_pickled_objects_are_refused_with_the_file_named(tmp_path):
    src = str(tmp_path / 'pickled.pth')
    torch.save({'state_dict': {'backbone.layers.0.x': torch.ones(1)},
                'meta': argparse.Namespace(config='python code')}, src)
    with pytest.raises(ValueError, match=r'pickled.pth: cannot be read with weights_only=True'):
        load_tool('convert_checkpoint').main([src, str(tmp_path / 'out.safetensors')])


@pytest.mark.parametrize('content, message', [
    ([torch.ones(1)], 'expected a dict'),
    ({'state_dict': {}}, 'no tensors'),
    ({'state_dict': {'a': torch.ones(1), 'b': 'text'}}, r"non-tensor entries \['b'\]"),
])
def test_malformed_contents_are_named(tmp_path, content, message):
    src = str(tmp_path / 'bad.pth')
    torch.save(content, src)
    with pytest.raises(ValueError, match=message):
        load_tool('convert_checkpoint').main([src, str(tmp_path / 'out.safetensors')])


def test_missing_source_and_bad_destination(tmp_path):
    tool = load_tool('convert_checkpoint')
    with pytest.raises(FileNotFoundError, match='/nope.pth'):
        tool.main(['/nope.pth', str(tmp_path / 'out.safetensors')])
    with pytest.raises(SystemExit, match='must end with .safetensors'):
        tool.main(['/nope.pth', str(tmp_path / 'out.pth')])
