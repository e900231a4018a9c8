"""A tiny ViT converted with ``to_integer`` per preset, its export, and ``tools/test.py --integer``."""
import json
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.integer import IntegerLinear, load_integer, save_integer, to_integer
from fqvit_det.nn.exact import set_exact_arithmetic
from fqvit_det.presets import make_spec

from ..helpers import ROOT, images, tiny_vit
from ..tiny_cls import make_images, write_config

ARCH = dict(model_name='vit_tiny_patch16_224', depth=2, img_size=64, num_classes=10)
PRESETS = {
    'fqvit_884': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4),
    'ptq4vit_w6a6': dict(method='ptq4vit', w_bits=6, a_bits=6, search=None),
    'repq_w4a4': dict(method='repq', w_bits=4, a_bits=4),
}
# integer GEMMs of the 2-block tiny ViT: 4 per block, the head, and the patch embedding where
# the preset quantizes the image (PTQ4ViT keeps it float)
GEMMS = {'fqvit_884': 10, 'ptq4vit_w6a6': 9, 'repq_w4a4': 10}


def _calibrated(name, device):
    model = tiny_vit().to(device)
    x = images(model, 8).to(device)
    spec = make_spec(**PRESETS[name])
    quantize_model(model, spec)
    CalibrationRunner(model, spec, progress=False).run([x[:4], x[4:]])
    return model, spec, x


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_tiny_vit_integer_agrees_with_the_simulation(name, device):
    model, spec, x = _calibrated(name, device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    integer = to_integer(model)
    dyadic = to_integer(model, requant='dyadic')
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not mutated
    assert sum(isinstance(m, IntegerLinear) for m in integer.modules()) == GEMMS[name]
    with torch.no_grad():
        sim, out, out_dyadic = model(x), integer(x), dyadic(x)
        set_exact_arithmetic(model)
        exact = model(x)
    # the integer model computes what the integer-exact simulation computes, bit for bit
    assert torch.equal(exact, out)
    # the float32 simulation and dyadic requantization differ only by codes at rounding ties
    for other in (sim, out_dyadic):
        assert torch.equal(other.argmax(1), out.argmax(1))
        assert float((other - out).abs().max()) < 0.1 * float(out.abs().max())


def test_save_load_gives_identical_outputs_and_packs_4_bit(tmp_path, device):
    from safetensors import safe_open

    from fqvit_det.integer.export import SMALL_PREFIX, read_integer
    for name in ('fqvit_884', 'repq_w4a4', 'ptq4vit_w6a6'):
        model, spec, x = _calibrated(name, device)
        integer = to_integer(model)
        path = str(tmp_path / f'{name}.safetensors')
        size = save_integer(integer, path, ARCH, spec)
        assert size == osp.getsize(path) and not any(p.name.startswith('.integer-') for p in tmp_path.iterdir())
        with safe_open(path, framework='pt') as f:
            entries = list(f.keys())
            assert set(f.metadata()) == {'format', 'bundle'}
        # small tensors travel concatenated per dtype; the header lists only the large ones
        assert len(entries) < 70 and any(k.startswith(SMALL_PREFIX) for k in entries)
        meta, tensors = read_integer(path)
        keys = list(tensors)
        # the large code tensors are Huffman-coded: lossless, and the file is smaller than the
        # plain one (entropy_coding=False), which stores every tensor as it is used
        huffman = [k for k, _, _ in json.loads(meta['huffman'])]
        assert huffman and all(k.endswith(('weight_codes', '.packed4', '.codes')) for k in huffman), huffman
        plain = str(tmp_path / f'{name}.plain.safetensors')
        assert save_integer(integer, plain, ARCH, spec, entropy_coding=False) > size
        meta_plain, tensors_plain = read_integer(plain)
        assert 'huffman' not in meta_plain
        assert tensors.keys() == tensors_plain.keys()
        assert all(torch.equal(tensors[k], tensors_plain[k]) for k in tensors)
        packed = [k for k in keys if k.endswith('weight_codes.packed4')]
        assert bool(packed) == (name == 'repq_w4a4')
        assert not [k for k in keys if k.endswith('.bias_int')]      # derived on loading
        # FQ-ViT quantizes the position embedding (qact_pos): stored as its 8-bit codes
        assert ('pos_embed.codes' in keys) == (name == 'fqvit_884')
        assert ('pos_embed' in keys) == (name != 'fqvit_884')
        # PTQ4ViT keeps the image float, so its patch convolution stays simulated: the weight of
        # that layer is stored as its codes too
        assert ('patch_embed.proj.weight.codes' in keys) == (name == 'ptq4vit_w6a6')
        assert not [k for k in keys if k.endswith('.weight') and 'norm' not in k]
        if name == 'fqvit_884':    # PTF factors (int64 in memory) as int8
            alpha = [k for k in keys if k.endswith('.alpha')]
            assert alpha and all(tensors[k].dtype == torch.int8 for k in alpha)
        loaded = load_integer(path, device=device)
        with torch.no_grad():
            assert torch.equal(integer(x), loaded(x))
        if name == 'repq_w4a4':     # files of the earlier formats still load
            from safetensors.torch import load_file, save_file
            v1 = str(tmp_path / 'v1.safetensors')     # /1: one entry per tensor, plain metadata
            save_file(tensors, v1, metadata={**meta, 'format': 'fqvit-det-integer/1'})
            v2 = str(tmp_path / 'v2.safetensors')     # /2: as /3 without entropy coding
            with safe_open(plain, framework='pt') as f:
                save_file(load_file(plain), v2, metadata={**f.metadata(), 'format': 'fqvit-det-integer/2'})
            with torch.no_grad():
                for old in (v1, v2, plain):
                    assert torch.equal(integer(x), load_integer(old, device=device)(x))


def test_entropy_code_round_trip_and_errors():
    from fqvit_det.integer.export import SMALL_NUMEL, entropy_code, entropy_decode
    g = torch.Generator().manual_seed(0)
    bell = torch.randn(64, 200, generator=g).mul(8).round().clamp(-127, 127).to(torch.int8)
    nibbles = torch.randint(0, 256, (64, 100), generator=g, dtype=torch.uint8) & 0x33
    noise = torch.randint(0, 256, (64, 100), generator=g, dtype=torch.uint8)   # incompressible
    small = bell[:1, :SMALL_NUMEL // 200]
    floats = torch.randn(64, 100, generator=g)
    state = dict(bell=bell, nibbles=nibbles, noise=noise, small=small, floats=floats)
    coded, manifest = entropy_code(state)
    assert sorted(k for k, _, _ in manifest) == ['bell', 'nibbles']
    # a Huffman code comes within a small fraction of a bit per byte of the empirical entropy
    p = torch.bincount(bell.reshape(-1).long() + 128).double() / bell.numel()
    bits = float(-(p[p > 0] * p[p > 0].log2()).sum())          # ≈ 5.05 for σ = 8
    assert coded['bell'].dtype == torch.uint8
    assert coded['bell'].numel() <= bell.numel() * (bits + 0.1) / 8 + 64
    for k in ('noise', 'small', 'floats'):
        assert coded[k] is state[k]
    back = entropy_decode(coded, manifest, 'x.safetensors')
    assert back.keys() == state.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())
    broken = dict(coded, bell=coded['bell'].clone())
    broken['bell'][7:] = 0
    with pytest.raises(ValueError, match=r"x.safetensors: entropy-coded tensor 'bell' is corrupt"):
        entropy_decode(broken, manifest, 'x.safetensors')
    wrong = [[k, dt, [shape[0] + 1] + shape[1:]] for k, dt, shape in manifest]
    with pytest.raises(ValueError, match=r"'bell' decodes to 12800 bytes, expected 13000"):
        entropy_decode(coded, wrong, 'x.safetensors')


def test_export_refuses_an_unconverted_model(tmp_path):
    with pytest.raises(ValueError, match='to_integer first'):
        save_integer(tiny_vit(), str(tmp_path / 'x.safetensors'), ARCH, make_spec('repq'))


def test_to_integer_needs_a_calibrated_model():
    model = tiny_vit()
    quantize_model(model, make_spec('repq', w_bits=4, a_bits=4))
    with pytest.raises(ValueError, match='calibrate first'):
        to_integer(model)


def test_tools_test_integer_on_a_few_images(tmp_path):
    data = make_images(str(tmp_path / 'imgs'))
    cfg = write_config(tmp_path / 'tiny.py', data)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    work = str(tmp_path / 'work')
    outs = {}
    logs = {}
    for tag, key, extra in (('quant', 'quant', []), ('integer', 'integer', ['--integer']),
                            ('exact', 'quant', ['--exact-arithmetic'])):
        proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'test.py'), cfg, '--work-dir', work,
                               '--out', str(tmp_path / f'{tag}.pkl'), *extra,
                               *(['--quant-state', osp.join(work, 'quant_state.safetensors')] if extra else [])],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        logs[tag] = proc.stdout + proc.stderr
        with open(osp.join(work, 'summary.json')) as f:
            assert key in json.load(f)
        with open(tmp_path / f'{tag}.pkl', 'rb') as f:
            outs[tag] = pickle.load(f)
    assert 'evaluating the integer model' in logs['integer']
    assert 'integer-exact arithmetic in' in logs['exact']
    # the integer model computes the integer-exact simulation's scores bit for bit
    for a, b in zip(outs['exact'], outs['integer']):
        assert torch.equal(a['pred_score'], b['pred_score'])
    for a, b in zip(outs['quant'], outs['integer']):
        assert int(a['pred_label']) == int(b['pred_label'])
        assert float((a['pred_score'] - b['pred_score']).abs().max()) < 0.1 * float(a['pred_score'].abs().max())


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_deit_detector_backbone_integer_equals_exact_simulation(name):
    """The DeiT detection backbone (dynamic image size, resampled position embedding, feature
    pyramid) converts as the classifier does: its four feature maps equal the integer-exact
    simulation's bit for bit."""
    from fqvit_det.mm.det import TimmViTBackbone, backbone_rules

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = TimmViTBackbone('vit_tiny_patch16_224')
            self.backbone.vit.blocks = self.backbone.vit.blocks[:2]

        def forward(self, x):
            return self.backbone(x)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():    # see tests/helpers.tiny_vit
        net.backbone.vit.cls_token.normal_(std=0.5)
        net.backbone.vit.pos_embed.normal_(std=0.5)
    spec = make_spec(**PRESETS[name])
    quantize_model(net, spec, rules=backbone_rules(net.backbone))
    x = torch.randn(4, 3, 40, 56)
    CalibrationRunner(net, spec, progress=False).run([x[:2], x[2:]])
    with torch.no_grad():
        integer = to_integer(net)
        set_exact_arithmetic(net)
        want, got = net(x), integer(x)
    assert len(integer.fqvit_integer_attention) == 2
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize('name, fused', [('repq_w4a4', 'codes'), ('fqvit_884', 'codes'),
                                         ('ptq4vit_w6a6', 'twin')])
def test_mlp_gelu_runs_in_fc1s_epilogue(name, fused):
    """timm's Mlp: fc1 returns fc2's input codes of rational_gelu(y) (uniform fc2) or fc2's
    twin-uniform operand pair (PTQ4ViT), act marked GELUInPreviousLayer. Either way, compiled
    kernels or torch ops, the outputs are the integer-exact simulation's (GELU included)."""
    from fqvit_det.integer import kernels
    from fqvit_det.integer.convert import GELUInPreviousLayer
    model, spec, x = _calibrated(name, 'cpu')
    integer = to_integer(model)
    mlp = integer.blocks[0].mlp
    assert (mlp.fc1.gelu_codes is not None) == (fused == 'codes')
    assert (mlp.fc1.gelu_twin is not None) == (fused == 'twin')
    assert type(mlp.act) is GELUInPreviousLayer
    before = kernels._backend()
    try:
        with torch.no_grad():
            set_exact_arithmetic(model)
            want = model(x)
            for backend in ('cpp', 'torch'):
                kernels.set_backend(backend)
                hidden = mlp.fc1(torch.randn(2, 5, mlp.fc1.in_features))
                if fused == 'twin':
                    assert hidden.dtype == torch.int8
                    assert hidden.shape == (2, 2, 5, mlp.fc1.out_features)
                else:
                    assert not hidden.is_floating_point()
                assert torch.equal(integer(x), want)
    finally:
        kernels.set_backend(before)
