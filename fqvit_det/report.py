"""Layer-wise quantization error report: SQNR and cosine similarity of every quantized module.

The same inputs run through the model twice per batch, once with every quantizer in float mode
and once quantized; forward hooks pair the k-th call of a module in the float pass with its k-th
call in the quantized pass and accumulate, per module,

    Σ x²,  Σ (x − x̂)²,  Σ x·x̂,  Σ x̂²        (x: float output, x̂: quantized output)

so only one batch's float outputs are ever held. The error is end-to-end: a module's quantized
output carries the error of every quantized module before it.

    SQNR = 10·log10(Σ x² / Σ (x − x̂)²)   (inf when the outputs are identical)
    cosine = Σ x·x̂ / sqrt(Σ x² · Σ x̂²)

Pure torch (matplotlib only for the PNG), so it works on any converted model; the mmengine tool
is ``tools/quant_report.py``.
"""
import csv
import io
import math
import os
import tempfile
from collections import deque
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from .walk import set_quant_mode
from .nn.modules import AttentionQuantizers, QuantConv2d, QuantLayerNorm, QuantLinear

REPORTED_TYPES = (QuantLinear, QuantConv2d, QuantLayerNorm)
FIELDS = ('index', 'name', 'type', 'sqnr_db', 'cosine', 'numel', 'calls', 'skipped')


def _quantizes_residual(m: nn.Module) -> bool:
    """A transformer block whose residual sums are quantized (FQ-ViT): its output is the quantized
    residual stream, reported per block."""
    return getattr(m, 'mlp_residual_quantizer', None) is not None


def report_modules(model: nn.Module):
    """(name, module) of every module whose output is reported, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, REPORTED_TYPES) or isinstance(getattr(m, 'aq', None), AttentionQuantizers)
            or _quantizes_residual(m)]


def _tensors(out):
    """Floating-point tensors of a module output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


class _Stats:
    __slots__ = ('order', 'type', 'sx2', 'sn2', 'sxy', 'sy2', 'numel', 'calls', 'skipped')

    def __init__(self, type_name):
        self.order, self.type = None, type_name
        self.sx2 = self.sn2 = self.sxy = self.sy2 = 0.0
        self.numel = self.calls = self.skipped = 0

    def add(self, ref: List[torch.Tensor], out: List[torch.Tensor]) -> None:
        if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
            self.skipped += 1  # e.g. a detector keeping a different number of boxes once quantized
            return
        for a, b in zip(ref, out):
            b = b.detach().double()
            a = a.to(device=b.device, dtype=torch.float64)
            self.sx2 += float((a * a).sum())
            self.sy2 += float((b * b).sum())
            self.sxy += float((a * b).sum())
            a.sub_(b)
            self.sn2 += float((a * a).sum())
            self.numel += a.numel()
        self.calls += 1

    def sqnr_db(self) -> float:
        if self.numel == 0:
            return float('nan')
        if self.sn2 == 0.0:
            return float('inf')
        if self.sx2 == 0.0:
            return float('-inf')
        return 10.0 * math.log10(self.sx2 / self.sn2)

    def cosine(self) -> float:
        if self.numel == 0:
            return float('nan')
        denom = math.sqrt(self.sx2 * self.sy2)
        if denom == 0.0:
            return 1.0 if self.sn2 == 0.0 else float('nan')
        return self.sxy / denom


class _Collector:
    def __init__(self, store_device=None):
        self.phase = 'float'
        self.store_device = store_device
        self.pending, self.stats = {}, {}

    def hook(self, name: str, module: nn.Module):
        self.pending[name] = deque()
        self.stats[name] = _Stats(type(module).__name__)

        def fn(mod, inputs, output):
            ts = _tensors(output)
            st = self.stats[name]
            if self.phase == 'float':
                if st.order is None:  # forward order = order in which outputs are produced
                    st.order = sum(s.order is not None for s in self.stats.values())
                self.pending[name].append([t.detach().to(self.store_device) if self.store_device
                                           else t.detach().clone() for t in ts])
            elif self.pending[name]:
                st.add(self.pending[name].popleft(), ts)
            else:  # called more often quantized than in float
                st.skipped += 1
        return fn

    def end_batch(self) -> None:
        for name, q in self.pending.items():
            self.stats[name].skipped += len(q)  # float calls without a quantized counterpart
            q.clear()


def layer_report(model: nn.Module, inputs_iter: Iterable, forward_fn: Optional[Callable] = None,
                 store_device=None) -> List[dict]:
    """SQNR / cosine of every quantized module output of a calibrated ``model``.

    Args:
        model: a converted and calibrated model (``fqvit_det.convert.quantize_model``).
        inputs_iter: batches; each runs once in float mode and once quantized.
        forward_fn: ``forward_fn(model, batch)`` (default ``model(batch)``), e.g. a wrapper's
            ``calib_forward``.
        store_device: where one batch's float outputs wait for the quantized pass (default:
            where they were produced; ``'cpu'`` saves accelerator memory on large inputs).

    Returns rows in forward order: ``dict(index, name, type, sqnr_db, cosine, numel, calls,
    skipped)``; ``numel`` counts the compared elements over all calls, ``calls`` the compared
    calls (shared modules aggregate over them), ``skipped`` the calls that could not be paired
    (different shapes or call counts between the passes). Modules that never ran are left out.
    The model is left in quant mode.
    """
    forward_fn = forward_fn or (lambda m, b: m(b))
    mods = report_modules(model)
    if not mods:
        raise ValueError('layer_report: the model has no quantized modules '
                         '(convert it with fqvit_det.convert.quantize_model first)')
    col = _Collector(store_device)
    handles = [m.register_forward_hook(col.hook(name, m)) for name, m in mods]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in inputs_iter:
                col.phase = 'float'
                set_quant_mode(model, 'float')
                forward_fn(model, batch)
                col.phase = 'quant'
                set_quant_mode(model, 'quant')
                forward_fn(model, batch)
                col.end_batch()
                batches += 1
    finally:
        for h in handles:
            h.remove()
        set_quant_mode(model, 'quant')
        model.train(was_training)
    if batches == 0:
        raise ValueError('layer_report: received no batches')
    ran = sorted(((st.order, name, st) for name, st in col.stats.items() if st.order is not None),
                 key=lambda t: t[0])
    return [dict(index=i, name=name, type=st.type, sqnr_db=st.sqnr_db(), cosine=st.cosine(),
                 numel=st.numel, calls=st.calls, skipped=st.skipped)
            for i, (_, name, st) in enumerate(ran)]


# --- writing ----------------------------------------------------------------------------------
def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fmt(v: float, digits: int) -> str:
    if isinstance(v, float) and math.isnan(v):
        return 'nan'
    if isinstance(v, float) and math.isinf(v):
        return 'inf' if v > 0 else '-inf'
    return f'{v:.{digits}f}'


def worst_layers(rows: List[dict], k: int = 5) -> List[dict]:
    """The ``k`` rows with the lowest SQNR (NaN rows excluded)."""
    valid = [r for r in rows if not math.isnan(r['sqnr_db'])]
    return sorted(valid, key=lambda r: r['sqnr_db'])[:k]


def _markdown(rows, title):
    lines = [f'# {title}', '',
             'End-to-end error of each quantized module output (float model vs. quantized model on '
             'the same images). SQNR = 10·log10(Σx² / Σ(x − x̂)²); `inf` = identical outputs.', '']
    worst = worst_layers(rows)
    if worst:
        lines.append('Worst layers: ' + ', '.join(f'`{r["name"]}` ({_fmt(r["sqnr_db"], 2)} dB)'
                                                  for r in worst))
        lines.append('')
    skipped = sum(r['skipped'] for r in rows)
    if skipped:
        lines += [f'{skipped} module calls could not be paired between the float and quantized '
                  'passes (different output shapes or call counts) and are not counted.', '']
    lines += ['| # | layer | type | SQNR (dB) | cosine | numel | calls |',
              '|---:|---|---|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f'| {r["index"]} | `{r["name"] or "(root)"}` | {r["type"]} | '
                     f'{_fmt(r["sqnr_db"], 2)} | {_fmt(r["cosine"], 6)} | {r["numel"]} | '
                     f'{r["calls"]}{" (+%d skipped)" % r["skipped"] if r["skipped"] else ""} |')
    return '\n'.join(lines) + '\n'


def _csv(rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(FIELDS)
    for r in rows:
        w.writerow([r['index'], r['name'], r['type'], _fmt(r['sqnr_db'], 4), _fmt(r['cosine'], 8),
                    r['numel'], r['calls'], r['skipped']])
    return buf.getvalue()


def _png(rows, title):
    """Bar chart of SQNR per layer, coloured by module type, worst layers annotated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(rows)
    vals = [r['sqnr_db'] for r in rows]
    finite = [v for v in vals if math.isfinite(v)]
    top = (max(finite) if finite else 0.0)
    top = top + max(abs(top) * 0.08, 2.0)
    bottom = min(0.0, min(finite) - 2.0) if finite else 0.0
    types = list(dict.fromkeys(r['type'] for r in rows))
    palette = ['#4C72B0', '#DD8452', '#55A868', '#C44E52', '#8172B3', '#937860', '#DA8BC3', '#8C8C8C']
    color = {t: palette[i % len(palette)] for i, t in enumerate(types)}

    fig = Figure(figsize=(min(max(10.0, 0.08 * n + 2.0), 22.0), 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(n))
    heights = [v if math.isfinite(v) else (top if v > 0 else bottom) if not math.isnan(v) else 0.0
               for v in vals]
    ax.bar(xs, heights, width=0.85, color=[color[r['type']] for r in rows], linewidth=0)
    inf_x = [i for i, v in enumerate(vals) if math.isinf(v) and v > 0]
    if inf_x:
        ax.scatter(inf_x, [top] * len(inf_x), marker='^', color='black', s=18, zorder=3)
    worst = [r for r in worst_layers(rows) if math.isfinite(r['sqnr_db'])]
    if worst:  # mark the worst bars, name them in a box (annotations collide on 100+ bars)
        ax.scatter([r['index'] for r in worst], [r['sqnr_db'] for r in worst], marker='v',
                   color='#B00000', s=28, zorder=4)
        for r in worst:
            ax.annotate(str(r['index']), xy=(r['index'], r['sqnr_db']), xytext=(0, 5),
                        textcoords='offset points', ha='center', va='bottom', fontsize=7,
                        color='#B00000', zorder=4)
        ax.text(0.005, 0.98, 'lowest SQNR:\n' + '\n'.join(
            f'#{r["index"]} {r["name"]} ({r["type"]}): {r["sqnr_db"]:.2f} dB' for r in worst),
            transform=ax.transAxes, ha='left', va='top', fontsize=8, family='monospace',
            color='#B00000', bbox=dict(boxstyle='round', facecolor='white', alpha=0.9,
                                       edgecolor='#B00000'))
    ax.set_xlim(-1, n)
    span = (top if top > 0 else 1.0) - bottom
    ax.set_ylim(bottom, top + 0.45 * span)  # headroom for the legend and the box
    ax.set_xlabel('layer index (forward order; names in layer_report.md / .csv)')
    ax.set_ylabel('SQNR (dB), higher is better')
    ax.set_title(title)
    ax.grid(axis='y', alpha=0.3)
    ax.set_axisbelow(True)
    step = 1 if n <= 20 else 2 if n <= 40 else 5 * int(math.ceil(n / 200.0))
    ax.set_xticks(list(range(0, n, step)))
    ax.tick_params(axis='x', labelsize=8)
    handles = [Patch(color=color[t], label=t) for t in types]
    if inf_x:
        handles.append(Line2D([], [], marker='^', color='black', linestyle='', label='inf (identical)'))
    ax.legend(handles=handles, loc='upper right', fontsize=8, ncol=min(len(handles), 3), framealpha=0.9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    return buf.getvalue()


def write_report(rows: List[dict], out_dir: str, title: str = 'Quantization error per layer') -> dict:
    """Write ``layer_report.md``, ``layer_report.csv`` and ``layer_report.png`` atomically.

    Returns the paths by kind (``md``, ``csv``, ``png``).
    """
    if not rows:
        raise ValueError('write_report: no rows')
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f'layer_report.{k}') for k in ('md', 'csv', 'png')}
    _atomic_write(paths['md'], _markdown(rows, title).encode('utf-8'))
    _atomic_write(paths['csv'], _csv(rows).encode('utf-8'))
    _atomic_write(paths['png'], _png(rows, title))
    return paths
