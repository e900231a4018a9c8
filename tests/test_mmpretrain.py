"""mmpretrain classifiers: converters (same roles as timm's), the timm → mmpretrain key mapping,
float equality with timm on real images, and the configs under configs/cls/."""
import collections
import pickle
import copy
import glob
import os.path as osp

import pytest
import timm
import torch

from fqvit_det.calibration import CalibrationRunner, named_quantizers
from fqvit_det.convert import detect_architecture, quantize_model
from fqvit_det.convert.timm_to_mmpretrain import mmpretrain_vit_to_timm, timm_vit_to_mmpretrain
from fqvit_det.nn.modules import QuantConv2d, QuantLayerNorm, QuantLinear
from fqvit_det.presets import make_spec

from .helpers import DATA, HAS_DATA, ROOT, images, tiny_swin, tiny_vit

mmpretrain = pytest.importorskip('mmpretrain')
from mmpretrain.registry import MODELS  # noqa: E402
from mmpretrain.utils import register_all_modules  # noqa: E402

register_all_modules(init_default_scope=False)

# A minimal search: it must run (and match timm's) on these models, not find good parameters.
FAST_SEARCH = dict(images=2, rounds=1, eq_n=8, levels=2, top_k=2, max_rows=64, attn_images=1,
                   attn_rows=16, grid_n=8, screen_rows=0, confirm=1)
PRESETS = {
    'fqvit_884': dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4),
    'ptq4vit_w8a8': dict(method='ptq4vit', w_bits=8, a_bits=8, search_cfg=FAST_SEARCH),
    'repq_w4a4': dict(method='repq', w_bits=4, a_bits=4),
    'adalog_w8a8': dict(method='adalog', w_bits=8, a_bits=8, search_cfg=FAST_SEARCH),
}


def build_mm(cfg):
    """An mmpretrain model, whatever default scope earlier tests (mmdet's runners) left set."""
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg)


def mm_vit_like(timm_model, device):
    """The mmpretrain ImageClassifier of ``tiny_vit``'s architecture, with its weights."""
    model = build_mm(dict(
        type='ImageClassifier',
        backbone=dict(type='VisionTransformer', img_size=64, patch_size=16,
                      arch=dict(embed_dims=192, num_layers=2, num_heads=3, feedforward_channels=768)),
        neck=None, head=dict(type='VisionTransformerClsHead', num_classes=10, in_channels=192)))
    model.load_state_dict(timm_vit_to_mmpretrain(timm_model.state_dict()), strict=True)
    return model.to(device).eval()


def mm_tiny_swin(device, seed=0):
    torch.manual_seed(seed)
    return build_mm(dict(
        type='ImageClassifier',
        backbone=dict(type='SwinTransformer', img_size=224,
                      arch=dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=256))).to(device).eval()


def role_counts(model):
    return collections.Counter(name.rpartition('.')[2] + ':' + type(q).__name__
                               for name, q in named_quantizers(model))


def assert_complete(model):
    for name, mod in model.named_modules():
        if type(mod) is torch.nn.Linear or type(mod) is torch.nn.Conv2d:
            pytest.fail(f'{name} is still a float {type(mod).__name__}')
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            assert mod.w_quantizer is not None, name
        if name.endswith(('.ln1', '.ln2', '.norm1', '.norm2')) and ('.layers.' in name or '.stages.' in name):
            assert isinstance(mod, QuantLayerNorm), name


@pytest.mark.parametrize('preset', PRESETS)
def test_mmpretrain_vit_quantizes_exactly_as_timm_vit(preset, device):
    """Same weights, same preset, same calibration batches: the quantized mmpretrain ViT gives the
    timm ViT's quantized logits bit for bit (same roles, same placement, same integer LayerNorm)."""
    ref = tiny_vit().to(device)
    mm = mm_vit_like(ref, device)
    assert detect_architecture(mm) == 'mmpretrain_vit'
    x = images(ref, 4).to(device)
    with torch.no_grad():
        torch.testing.assert_close(mm(x, mode='tensor'), ref(x), rtol=0, atol=1e-5)
    outs = []
    for model in (ref, mm):
        spec = make_spec(**PRESETS[preset])
        quantize_model(model, spec)
        CalibrationRunner(model, spec, progress=False).run([x[:2], x[2:]])
        with torch.no_grad():
            outs.append(model(x))
    assert_complete(mm)
    assert role_counts(mm) == role_counts(ref)
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize('preset', PRESETS)
def test_mmpretrain_swin_has_timm_swin_roles_and_calibrates(preset, device):
    ref_model, mm = tiny_swin().to(device), mm_tiny_swin(device)
    assert detect_architecture(mm) == 'mmpretrain_swin'
    x = images(ref_model, 4).to(device)
    with torch.no_grad():
        ref = mm(x)
    counts = []
    for model in (ref_model, mm):
        spec = make_spec(**PRESETS[preset])
        quantize_model(model, spec)
        counts.append(role_counts(model))
    assert counts[1] == counts[0]
    assert_complete(mm)
    CalibrationRunner(mm, spec, progress=False).run([x[:2], x[2:]])
    with torch.no_grad():
        out = mm(x)
    sqnr = (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()
    assert sqnr > (8 if preset == 'repq_w4a4' else 20), f'{preset}: SQNR {sqnr:.1f} dB'
    if PRESETS[preset]['method'] == 'fqvit':  # FQ-ViT: integer LayerNorm on the PTF residual codes
        norms = [m for n, m in mm.named_modules() if n.endswith('blocks.0.norm1')]
        assert norms and norms[0].integer and norms[0].input_source is not None


def test_key_mapping_round_trip_and_refusals():
    state = tiny_vit().state_dict()
    mm = timm_vit_to_mmpretrain(state)
    assert 'backbone.layers.1.ffn.layers.0.0.weight' in mm and 'head.layers.head.bias' in mm
    back = mmpretrain_vit_to_timm(mm)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)  # renamed, never copied or changed
    with pytest.raises(ValueError, match="'dist_token'"):
        timm_vit_to_mmpretrain({**state, 'dist_token': torch.zeros(1)})
    with pytest.raises(ValueError, match="'backbone.layers.0.attn.rel_pos'"):
        mmpretrain_vit_to_timm({**mm, 'backbone.layers.0.attn.rel_pos': torch.zeros(1)})


def arch_depths(model):
    backbone = model.backbone
    if hasattr(backbone, 'stages'):
        return [len(stage.blocks) for stage in backbone.stages]
    return [len(backbone.layers)]


# --- configs/cls/mmpretrain_*: build and convert every model (random weights, no data) ---------
MM_BASES = sorted(glob.glob(osp.join(ROOT, 'configs', 'cls', '_mmpretrain_*.py')))
PRESET_SUFFIXES = ('w8a8a4', 'ptq4vit_w6a6', 'repq_w4a4', 'adalog_w4a4')


@pytest.mark.parametrize('base', MM_BASES, ids=[osp.basename(p)[len('_mmpretrain_'):-3] for p in MM_BASES])
def test_every_mmpretrain_config_builds_and_converts(base):
    from mmengine.config import Config

    from fqvit_det.mm.launch import prepare_config
    from fqvit_det.mm.quant_model import split_quant_cfg
    model_key = osp.basename(base)[len('_mmpretrain_'):-3]
    paths = [osp.join(ROOT, 'configs', 'cls', f'mmpretrain_{model_key}_{s}.py') for s in PRESET_SUFFIXES]
    assert all(osp.isfile(p) for p in paths), 'a preset config is missing'
    float_model = None
    for path in paths:
        cfg = prepare_config(Config.fromfile(path), check_data=False)
        assert cfg.model.type == 'QuantizedClassifier' and cfg.model.checkpoint
        if float_model is None:
            torch.manual_seed(0)
            float_model = build_mm(cfg.model.classifier).eval()
            arch = detect_architecture(float_model)
            assert arch == ('mmpretrain_swin' if 'swin' in model_key else 'mmpretrain_vit')
        model = copy.deepcopy(float_model)
        spec, _ = split_quant_cfg(cfg.model.quant_cfg.to_dict())
        quantize_model(model, spec)
        assert_complete(model)
        roles = role_counts(model)
        weights = sum(n for k, n in roles.items() if k.startswith('w_quantizer:'))
        assert weights == sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules())
        attentions = sum(n for k, n in roles.items() if k.startswith('probs:'))
        assert attentions == (sum(arch_depths(float_model)))
        if spec.method == 'fqvit':  # the residual stream is quantized (PTF) where it is formed
            assert roles['attn_residual_quantizer:PTFQuantizer'] == attentions
        if model_key in ('deit_tiny', 'swin_tiny') and spec.method == 'fqvit':
            with torch.no_grad():  # one forward through the converted modules (quantizers still float)
                assert torch.isfinite(model(torch.randn(1, 3, 224, 224), mode='tensor')).all()


# --- real weights and real images ----------------------------------------------------------------
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f'real data not found at {DATA}')
DEIT_CKPT = osp.join(DATA, 'deit_tiny', 'deit_tiny_patch16_224.safetensors')
MM_DEIT = osp.join(ROOT, 'configs', 'cls', 'mmpretrain_deit_tiny_w8a8a4.py')
TIMM_DEIT = osp.join(ROOT, 'configs', 'cls', 'deit_tiny_w8a8a4.py')


def real_batch(config, n, monkeypatch):
    """The first ``n`` val1300 images through ``config``'s own dataset and pipeline, collated."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmpretrain.registry import DATASETS
    monkeypatch.setenv('FQVIT_DATA', osp.abspath(DATA))
    cfg = Config.fromfile(config)
    ds_cfg = cfg.test_dataloader.dataset.to_dict()
    ds_cfg['indices'] = n
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmpretrain'):  # earlier tests may have set mmdet's
        ds = DATASETS.build(ds_cfg)
    return cfg, pseudo_collate([ds[i] for i in range(n)])


@needs_data
def test_converted_deit_tiny_gives_timm_float_logits_on_real_images(monkeypatch):
    from fqvit_det.mm.cls import QuantizedClassifier
    from fqvit_det.mm.checkpoint import load_weights
    cfg, batch = real_batch(MM_DEIT, 6, monkeypatch)
    timm_cfg, timm_batch = real_batch(TIMM_DEIT, 6, monkeypatch)
    mm = QuantizedClassifier(cfg.model, checkpoint=DEIT_CKPT, data_preprocessor=cfg.data_preprocessor)
    via_timm = QuantizedClassifier(timm_cfg.model, checkpoint=DEIT_CKPT,
                                   data_preprocessor=timm_cfg.data_preprocessor)
    reference = timm.create_model('deit_tiny_patch16_224')
    reference.load_state_dict(load_weights(DEIT_CKPT))
    reference.eval()
    with torch.no_grad():
        inputs = mm.data_preprocessor(batch, False)['inputs']
        torch.testing.assert_close(via_timm.data_preprocessor(timm_batch, False)['inputs'], inputs)
        want = reference(inputs)
        torch.testing.assert_close(mm(inputs), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(via_timm(inputs), want, rtol=0, atol=1e-4)
        labels = torch.cat([s.gt_label for s in batch['data_samples']])
    assert (want.argmax(-1) == labels).sum() >= 4  # real weights on real images


@needs_data
def test_mmpretrain_deit_config_through_tools_test(tmp_path):
    from .test_cls_e2e import run
    small = ['--cfg-options', 'test_dataloader.dataset.indices=8', 'test_dataloader.batch_size=4',
             'test_dataloader.num_workers=0', 'calib_dataloader.num_workers=0', 'calib_dataloader.batch_size=4']
    summary, work, log = run([MM_DEIT, '--compare-float', '--calib-images', '8', '--out',
                              str(tmp_path / 'preds.pkl'), *small], tmp_path, 'calib')
    assert 'timm ViT key names; renamed to mmpretrain' in log
    fp, q = summary['float']['metrics'], summary['quant']['metrics']
    assert fp['accuracy/top1'] >= 50 and abs(fp['accuracy/top1'] - q['accuracy/top1']) <= 25
    state = osp.join(work, 'quant_state.safetensors')
    summary2, _, log2 = run([MM_DEIT, '--quant-state', state, '--out', str(tmp_path / 'preds2.pkl'), *small],
                            tmp_path, 'reload')
    assert 'calibration batch' not in log2
    first, second = (pickle.load(open(tmp_path / f, 'rb')) for f in ('preds.pkl', 'preds2.pkl'))
    assert len(first) == len(second) == 8
    for a, b in zip(first, second):
        assert torch.equal(a['pred_score'], b['pred_score'])
    assert summary2['quant']['metrics'] == q


def test_convert_tool_round_trip_and_verification(tmp_path):
    from safetensors.torch import load_file, save_file

    from .tiny_cls import load_tool
    tool = load_tool('convert_timm_to_mmpretrain')
    state = {k: v.contiguous() for k, v in tiny_vit().state_dict().items()}
    src, mid, back = (str(tmp_path / f) for f in ('timm.safetensors', 'mm.safetensors', 'back.safetensors'))
    save_file(state, src)
    cfg = tmp_path / 'tiny_mm.py'
    cfg.write_text("model = dict(type='ImageClassifier', backbone=dict(type='VisionTransformer', img_size=64, "
                   "arch=dict(embed_dims=192, num_layers=2, num_heads=3, feedforward_channels=768)), "
                   "neck=None, head=dict(type='VisionTransformerClsHead', num_classes=10, in_channels=192))\n")
    tool.main([src, mid, '--config', str(cfg)])
    tool.main([mid, back, '--reverse'])
    again = load_file(back)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    # An mmengine-style .pth (weights under state_dict, metadata beside) loads into the wrapper.
    from fqvit_det.mm.cls import QuantizedClassifier
    pth = str(tmp_path / 'mm.pth')
    torch.save(dict(meta=dict(mmpretrain_version='1.2.0', dataset_meta=dict(classes=('a', 'b'))),
                    state_dict=load_file(mid)), pth)
    from mmengine.config import Config
    model = QuantizedClassifier(Config.fromfile(str(cfg)).model, checkpoint=pth)
    for k, v in load_file(mid).items():
        assert torch.equal(model.classifier.state_dict()[k], v), k
    with pytest.raises(SystemExit, match='--reverse'):
        tool.main([mid, back, '--reverse', '--config', str(cfg)])


def test_plain_classifier_checkpoint_loads_into_the_wrapper_through_mmengine(tmp_path):
    """mmpretrain's own tools/test.py loads its checkpoint argument into the model with mmengine
    (non-strict): a plain classifier's backbone.* / head.* keys must land in the wrapped classifier."""
    from mmengine.config import Config
    from mmengine.runner.checkpoint import load_checkpoint

    from fqvit_det.convert.timm_to_mmpretrain import timm_vit_to_mmpretrain
    from fqvit_det.mm.cls import QuantizedClassifier
    cfg = tmp_path / 'tiny_mm.py'
    cfg.write_text("model = dict(type='ImageClassifier', backbone=dict(type='VisionTransformer', img_size=64, "
                   "arch=dict(embed_dims=192, num_layers=2, num_heads=3, feedforward_channels=768)), "
                   "neck=None, head=dict(type='VisionTransformerClsHead', num_classes=10, in_channels=192))\n")
    state = timm_vit_to_mmpretrain({k: v.contiguous() for k, v in tiny_vit().state_dict().items()})
    pth = str(tmp_path / 'plain.pth')
    torch.save(dict(meta=dict(), state_dict=state), pth)
    model = QuantizedClassifier(Config.fromfile(str(cfg)).model,
                                quant_cfg=dict(method='repq', w_bits=4, a_bits=4))
    load_checkpoint(model, pth, map_location='cpu')
    own = model.classifier.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
