"""``run_search``: the layer-wise search after calibration (PTQ4ViT Hessian-guided grid, AdaLog FPCS).

The calibration runner calls it once every quantizer is calibrated and in 'quant' mode
(reference §1.2, §1.3, §7). Protocol (parallel, as in both papers):

1. capture from the float model (``capture.py``);
2. search every module on its own captured data, so no quantization error of earlier layers
   reaches it (``linear.py``, ``attention.py``), then ``module.refresh()``.

``spec.search``: 'hessian' (PTQ4ViT: the exhaustive α grid of ``grid_n + 1`` multipliers for
uniform quantizers) or 'fpcs' (AdaLog: FPCS over α, q, (Δ, q)); twin uniform exponents are always
searched on their full grids. ``spec.search_cfg`` (``config.SEARCH_KEYS``) holds the objective
(``metric``) and the cost controls, all documented deviations from the papers' exhaustive GPU
searches: ``screen_rows`` / ``confirm`` (candidates scored on a subset of rows — MSE: evenly spaced;
'hessian': the rows with the largest Σ_c g², which on DeiT-Tiny hold ~97 % of the Fisher weight in
1/8 of the rows — and the best re-scored on all rows), ``fpcs_tol`` (FPCS stops once a level
improves the best score by no more than this fraction), ``chunk_elems``.

Every step also scores the current parameters, which win ties, so a module's score never
decreases.
"""
import time
from typing import Callable

from torch import nn

from ..log import get_logger
from ..nn.modules import AttentionQuantizers, QuantConv2d, QuantLinear
from .attention import search_attention
from .capture import capture
from .config import resolve_search_cfg
from .linear import search_linear
from .spaces import active, searchable, weight_space


def _feeders(model):
    """Linear path → (LayerNorm output quantizer, searched-here) for Linears without an input
    quantizer of their own (qkv / fc1 / patch-merging reduction: the norm's output quantizer
    quantizes their input). A norm feeding several Linears is searched with the first."""
    out = {}
    for norm_path, lin_paths in getattr(model, 'fqvit_reparam_pairs', []) or []:
        try:
            norm = model.get_submodule(norm_path)
        except AttributeError:
            continue
        oq = getattr(norm, 'out_quantizer', None)
        if oq is None or getattr(norm, 'integer', False):
            continue
        for i, p in enumerate(lin_paths):
            out[p] = (oq, i == 0)
    return out


def targets(model):
    """([(path, module, input quantizer, search the input?)], [(path, attention)], {path: why
    not searched})."""
    feeders = _feeders(model)
    lins, attns, skipped = [], [], {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            if isinstance(mod, QuantConv2d) and mod.groups != 1:
                skipped[name] = 'grouped convolution'
                continue
            in_q, own = mod.in_quantizer, True
            if in_q is None and name in feeders:
                in_q, own = feeders[name]
            i_ok = own and active(in_q) and searchable(in_q)
            if weight_space(mod) is not None or i_ok:
                lins.append((name, mod, in_q, bool(i_ok)))
        elif isinstance(mod, AttentionQuantizers):
            roles = [mod.q, mod.k, mod.v] + ([] if mod.fused_softmax else [mod.probs])
            if any(active(q) and searchable(q) for q in roles):
                attns.append((name, mod))
    return lins, attns, skipped


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from mmengine.utils import ProgressBar
    except ImportError:
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        bar = tqdm(total=total, desc='layer search')
        return bar
    return ProgressBar(total)


def run_search(model: nn.Module, spec, batches, forward_fn: Callable = None,
               progress: bool = True) -> dict:
    """Search the quantizer parameters of every Linear / Conv / attention of a calibrated model.

    Args:
        model: converted and calibrated model (quantizers in 'quant' mode).
        spec: its ``QuantSpec``; ``spec.search`` is 'hessian' or 'fpcs'; ``spec.search_cfg``
            is resolved with ``resolve_search_cfg`` (already done by ``make_spec``).
        batches: the calibration batches (re-iterated; the first ``images`` images are used).
        forward_fn: ``forward_fn(model, batch) -> output`` (default ``model(batch)``); metric
            'hessian' needs classification logits as output.
        progress: a progress bar over the modules and a summary log line.

    Returns the report: ``dict(search, metric, images, modules_searched, capture_s, search_s,
    total_s, modules={path: dict(metric, before, after, seconds, params, searched, rounds, …)},
    skipped={path: reason})``. Scores are higher-is-better (negative errors); ``params`` holds
    each searched quantizer's chosen parameters (scalars, or min / mean / max of tensors).
    """
    if spec.search not in ('hessian', 'fpcs'):
        raise ValueError(f'quant_cfg.search must be "hessian" or "fpcs" for a layer search, got '
                         f'{spec.search!r}')
    cfg = resolve_search_cfg(spec.method, spec.search, spec.search_cfg)
    logger = get_logger()
    forward_fn = forward_fn or (lambda m, b: m(b))
    method = 'grid' if spec.search == 'hessian' else 'fpcs'
    lins, attns, skipped = targets(model)
    if cfg['attn_images'] == 0:
        skipped.update((n, 'search_cfg.attn_images = 0') for n, _ in attns)
        attns = []
    report = dict(search=spec.search, metric=cfg['metric'], images=0, modules_searched=0,
                  capture_s=0.0, search_s=0.0, total_s=0.0, modules={}, skipped=skipped)
    if not lins and not attns:
        logger.info('layer search: nothing to search')
        return report
    t0 = time.time()
    rows, records, seen = capture(model, [m for _, m, _, _ in lins], [a for _, a in attns],
                                  batches, forward_fn, cfg)
    report.update(images=seen, capture_s=time.time() - t0)
    if progress:
        logger.info(f'layer search ({spec.search}, metric {cfg["metric"]}): {len(lins)} Linear/Conv '
                    f'+ {len(attns)} attention modules, {seen} images captured in '
                    f'{report["capture_s"]:.1f}s')
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    jobs = sorted([(order[id(m)], n, m, (q, s)) for n, m, q, s in lins]
                  + [(order[id(a)], n, a, None) for n, a in attns], key=lambda j: j[0])
    bar = _progress_bar(len(jobs), progress)
    t1 = time.time()
    for _, name, mod, extra in jobs:
        t = time.time()
        if extra is not None:
            X, G, in_ndim = rows.pop(mod)
            rep = (search_linear(mod, X, G, in_ndim, extra[0], extra[1], method, cfg)
                   if X is not None else dict(skipped='module never ran on the calibration data'))
        else:
            recs = records.pop(mod)
            rep = (search_attention(mod, recs, method, cfg) if recs
                   else dict(skipped='attention never ran on the calibration data'))
        if 'skipped' in rep:
            skipped[name] = rep['skipped']
        else:
            rep['seconds'] = time.time() - t
            report['modules'][name] = rep
            logger.debug(f'layer search {name} ({"+".join(rep["searched"])}, {rep["metric"]}): '
                         f'score {rep["before"]:.4g} -> {rep["after"]:.4g}, {rep["rounds"]} '
                         f'round(s), {rep["seconds"]:.1f}s')
        if bar is not None:
            bar.update()
    report.update(modules_searched=len(report['modules']), search_s=time.time() - t1,
                  total_s=time.time() - t0)
    if progress:
        logger.info(f'layer search done: {report["modules_searched"]} modules in '
                    f'{report["total_s"]:.1f}s ({len(skipped)} not searched'
                    + (f': {", ".join(sorted(skipped)[:5])}' if skipped else '') + ')')
    return report
