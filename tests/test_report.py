"""Layer-wise quantization error report (fqvit_det.report) and tools/quant_report.py."""
import csv
import importlib.util
import math
import os
import os.path as osp

import numpy as np
import pytest
import timm
import torch
from torch import nn

from fqvit_det.calibration import CalibrationRunner, named_quantizers, set_quant_mode
from fqvit_det.convert import quantize_model
from fqvit_det.convert.common import Rule
from fqvit_det.presets import make_spec
from fqvit_det.report import layer_report, report_modules, worst_layers, write_report


ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODULE = 'blocks.1.mlp.fc1'


def _tiny_vit(bits, calib):
    torch.manual_seed(0)  # same float weights for every bit width
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=2, img_size=64,
                              num_classes=10).eval()
    with torch.no_grad():  # see tests/helpers.tiny_vit: keep the class token alive at 4 bits
        model.cls_token.normal_(std=0.5)
        model.pos_embed.normal_(std=0.5)
    spec = make_spec('fqvit', bits, bits, bits, lis=False)
    quantize_model(model, spec)
    CalibrationRunner(model, spec, progress=False).run([calib])
    return model


@pytest.fixture(scope='module')
def data():
    g = torch.Generator().manual_seed(1)
    return dict(calib=torch.randn(4, 3, 64, 64, generator=g),
                batches=[torch.randn(2, 3, 64, 64, generator=g), torch.randn(3, 3, 64, 64, generator=g)])


@pytest.fixture(scope='module')
def vit8(data):
    return _tiny_vit(8, data['calib'])


def _reference(model, module_name, batches):
    """SQNR / cosine of one module, computed independently (own hook, numpy float64)."""
    outs = {'float': [], 'quant': []}
    mode = {}
    h = model.get_submodule(module_name).register_forward_hook(
        lambda m, i, o: outs[mode['m']].append(o.detach().double().numpy().ravel()))
    with torch.no_grad():
        for m in ('float', 'quant'):
            mode['m'] = m
            set_quant_mode(model, m)
            for b in batches:
                model(b)
    h.remove()
    x, xq = np.concatenate(outs['float']), np.concatenate(outs['quant'])
    sqnr = 10 * np.log10(np.sum(x ** 2) / np.sum((x - xq) ** 2))
    cos = np.dot(x, xq) / (np.linalg.norm(x) * np.linalg.norm(xq))
    return float(sqnr), float(cos), x.size


def test_layer_report_matches_reference(vit8, data):
    rows = layer_report(vit8, data['batches'])
    by_name = {r['name']: r for r in rows}
    # every quantized module output, plus the attention modules owning ``aq``, in forward order
    expected = {n for n, _ in report_modules(vit8)}
    assert set(by_name) == expected
    assert 'blocks.0.attn' in by_name and by_name['blocks.0.attn']['type'] == 'QuantTimmAttention'
    # FQ-ViT quantizes the residual stream: each block's output (its quantized sum) is a row
    assert by_name['blocks.1']['type'] == 'QuantTimmBlock'
    assert by_name['blocks.1']['sqnr_db'] == pytest.approx(_reference(vit8, 'blocks.1', data['batches'])[0], rel=1e-6)
    names = [r['name'] for r in rows]
    assert names[0] == 'patch_embed.proj' and names[-1] == 'head'
    assert names.index('blocks.0.norm1') < names.index('blocks.0.attn.qkv') < \
        names.index('blocks.0.mlp.fc2') < names.index('blocks.1.norm1')
    assert [r['index'] for r in rows] == list(range(len(rows)))
    assert all(r['calls'] == 2 and r['skipped'] == 0 for r in rows)
    # quant mode afterwards
    assert all(q.mode == 'quant' for _, q in named_quantizers(vit8))

    sqnr, cos, numel = _reference(vit8, MODULE, data['batches'])
    row = by_name[MODULE]
    assert row['numel'] == numel
    assert row['sqnr_db'] == pytest.approx(sqnr, rel=1e-6)
    assert row['cosine'] == pytest.approx(cos, rel=1e-9)
    assert 0 < row['sqnr_db'] < 80 and 0.9 < row['cosine'] < 1
    # the attention output is its projection's output (proj_drop is identity in eval)
    assert by_name['blocks.0.attn']['sqnr_db'] == pytest.approx(by_name['blocks.0.attn.proj']['sqnr_db'])
    # a second report on the same model and data gives the same numbers (nothing left behind)
    again = {r['name']: r for r in layer_report(vit8, data['batches'])}
    assert again[MODULE]['sqnr_db'] == pytest.approx(row['sqnr_db'], rel=1e-9)


def test_more_bits_less_error(vit8, data):
    vit4 = _tiny_vit(4, data['calib'])
    r8 = {r['name']: r for r in layer_report(vit8, data['batches'][:1])}
    r4 = {r['name']: r for r in layer_report(vit4, data['batches'][:1])}
    for name in (MODULE, 'patch_embed.proj', 'head'):
        assert r8[name]['sqnr_db'] > r4[name]['sqnr_db'] + 6, name
        assert r8[name]['cosine'] > r4[name]['cosine'], name


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


def test_shared_module_aggregates_calls():
    torch.manual_seed(0)
    model = _Shared().eval()
    spec = make_spec('fqvit', 4, 4, 4, lis=False)
    quantize_model(model, spec, rules=[Rule('lin', 'linear', dict(weight='weight', input='proj_input'))])
    x = torch.randn(16, 8)
    CalibrationRunner(model, spec, progress=False).run([x])
    (row,) = layer_report(model, [x[:5], x[5:]])
    assert row['name'] == 'lin' and row['calls'] == 4 and row['numel'] == 2 * 16 * 8
    # reference: both calls of both batches pooled
    outs = {}
    h = model.lin.register_forward_hook(lambda m, i, o: outs.setdefault(mode, []).append(o.double()))
    with torch.no_grad():
        for mode in ('float', 'quant'):
            set_quant_mode(model, mode)
            model(x)
    h.remove()
    a, b = torch.cat([o.ravel() for o in outs['float']]), torch.cat([o.ravel() for o in outs['quant']])
    assert row['sqnr_db'] == pytest.approx(float(10 * torch.log10((a ** 2).sum() / ((a - b) ** 2).sum())),
                                           rel=1e-6)


def test_identical_outputs_report_inf():
    torch.manual_seed(0)
    model = _Shared().eval()
    spec = make_spec('fqvit', 8, 8, 8, lis=False)
    quantize_model(model, spec, rules=[Rule('lin', 'linear', dict(weight='weight', input='proj_input'))])
    x = torch.randn(4, 8)
    CalibrationRunner(model, spec, progress=False).run([x])
    model.lin.w_quantizer, model.lin.in_quantizer = None, None  # nothing quantized any more
    (row,) = layer_report(model, [x])
    assert row['sqnr_db'] == math.inf and row['cosine'] == pytest.approx(1.0)


def test_write_report(vit8, data, tmp_path):
    rows = layer_report(vit8, data['batches'][:1])
    rows[1] = dict(rows[1], sqnr_db=math.inf)  # inf is written as such
    paths = write_report(rows, str(tmp_path / 'rep'), 'tiny ViT W8A8')
    assert set(paths) == {'md', 'csv', 'png'}
    md = open(paths['md']).read()
    assert md.startswith('# tiny ViT W8A8') and f'`{MODULE}`' in md and '| inf |' in md
    table = [l for l in md.splitlines() if l.startswith('| ') and '`' in l]
    assert [l.split('`')[1] for l in table] == [r['name'] for r in rows]  # forward order
    with open(paths['csv']) as f:
        got = list(csv.DictReader(f))
    assert [g['name'] for g in got] == [r['name'] for r in rows]
    assert got[1]['sqnr_db'] == 'inf'
    assert float(got[2]['sqnr_db']) == pytest.approx(rows[2]['sqnr_db'], abs=1e-4)
    png = open(paths['png'], 'rb').read()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
    assert not [f for f in os.listdir(tmp_path / 'rep') if f.endswith('.tmp')]
    assert worst_layers(rows, 3) == sorted(rows, key=lambda r: r['sqnr_db'])[:3]


# --- tools/quant_report.py ----------------------------------------------------------------
def _tool():
    spec = importlib.util.spec_from_file_location('quant_report', osp.join(ROOT, 'tools', 'quant_report.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_missing_files(tmp_path):
    tool = _tool()
    with pytest.raises(FileNotFoundError, match='config'):
        tool.main([str(tmp_path / 'nope.py')])
    with pytest.raises(FileNotFoundError, match='--quant-state'):
        tool.main([osp.join(ROOT, 'configs/cls/deit_tiny_w8a8a4.py'),
                   '--quant-state', str(tmp_path / 'missing.safetensors')])


DATA = os.environ.get('FQVIT_DATA') or osp.normpath(osp.join(ROOT, '..', 'shared', 'data'))


@pytest.mark.skipif(not osp.isdir(DATA), reason=f'real data not available at {DATA}')
def test_tool_end_to_end_deit_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('FQVIT_DATA', osp.abspath(DATA))
    monkeypatch.chdir(ROOT)
    out = tmp_path / 'report'
    res = _tool().main([
        'configs/cls/deit_tiny_w8a8a4.py', '--num-images', '2', '--out-dir', str(out),
        '--cfg-options', 'custom_hooks.0.num_images=4', 'custom_hooks.0.dataloader.batch_size=4',
        'custom_hooks.0.dataloader.num_workers=0', 'test_dataloader.num_workers=0'])
    rows = res['rows']
    # patch embed, 12 x (2 norms, qkv, proj, attn, fc1, fc2, the block = its quantized residual sum), norm, head
    assert len(rows) == 1 + 12 * 8 + 2
    assert rows[0]['name'] == 'patch_embed.proj' and rows[-1]['name'] == 'head'
    assert all(math.isfinite(r['sqnr_db']) and r['sqnr_db'] > 0 for r in rows)
    assert all(r['numel'] > 0 and r['skipped'] == 0 for r in rows)
    assert rows[-1]['numel'] == 2 * 1000  # 2 test images x 1000 logits
    for name in ('layer_report.md', 'layer_report.csv', 'layer_report.png', 'quant_state.safetensors'):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert str(out / 'layer_report.md') in printed and 'worst layers' in printed
    assert 'on 4 images' in (out / 'layer_report.md').read_text()
