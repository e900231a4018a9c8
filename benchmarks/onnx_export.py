#!/usr/bin/env python
"""ONNX export benchmark: DeiT-Tiny (real weights) exported by ``fqvit_det.export.export_onnx`` and run in
onnxruntime (CPU) against our simulated model on all val1300 images.

    python benchmarks/onnx_export.py [--rows fqvit_w8a8,fqvit_w8a8a4,repq_w4a4,repq_w6a6,ptq4vit_w6a6]
                                     [--state-dir work_dirs/onnx_states] [--skip-latency]

Per row: calibrate (or load ``<state-dir>/<row>.safetensors``, written on the first run), evaluate the
simulated model, export, run the ONNX model in onnxruntime (ORT_ENABLE_ALL, 2 intra-op threads) on the
same images: top-1 agreement with the simulated model, top-1 accuracy, max |logit difference| (also
with graph optimizations off, where only the float kernels differ), file size, and which integer
kernels onnxruntime fused (from its saved optimized graph). Latency: batch 1 and 32, 2 threads,
rounds in which every variant runs one block in rotated order (bs1: 3 warm-up + 10 timed calls,
bs32: 1 + 2), ratio to torch fp32 eager in the same round, median over rounds; variants are torch fp32
eager (timm), the float model exported to ONNX (timm with fused_attn=False) in onnxruntime, and every
exported quantized model. Writes benchmarks/results/onnx_export.json and benchmarks/RESULTS.md.
"""
import argparse
import copy
import datetime
import json
import os
import os.path as osp
import statistics
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from fqvit_det.calibration import CalibrationRunner  # noqa: E402
from fqvit_det.convert import quantize_model  # noqa: E402
from fqvit_det.export import export_onnx  # noqa: E402
from fqvit_det.export.onnx import EXACT_FLOAT_INPUT_GEMM, export_forwards  # noqa: E402
from fqvit_det.mm.checkpoint import load_weights  # noqa: E402
from fqvit_det.nn.exact import float64_gemms_set, set_exact_arithmetic  # noqa: E402
from fqvit_det.presets import make_spec  # noqa: E402
from fqvit_det.state import load_quant_state, save_quant_state  # noqa: E402

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from imagenet_images import load_images  # noqa: E402
from results_md import load_result, machine_info, save_result  # noqa: E402

MODEL = 'deit_tiny_patch16_224'
# name: (quant_cfg, calibration images) — the configs/cls presets, calibrated as cls_fidelity.py does
ROWS = {
    'fqvit_w8a8': (dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=8, ptf=True, lis=False), 1000),
    'fqvit_w8a8a4': (dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4), 1000),
    'repq_w4a4': (dict(method='repq', w_bits=4, a_bits=4), 32),
    'repq_w6a6': (dict(method='repq', w_bits=6, a_bits=6), 32),
    'ptq4vit_w6a6': (dict(method='ptq4vit', w_bits=6, a_bits=6), 32),
    'adalog_w6a6': (dict(method='adalog', w_bits=6, a_bits=6), 32),
}
DEFAULT_ROWS = 'fqvit_w8a8,fqvit_w8a8a4,repq_w4a4,repq_w6a6,ptq4vit_w6a6'
INTEGER_OPS = ('QLinearMatMul', 'MatMulIntegerToFloat', 'QLinearConv', 'ConvInteger', 'MatMulInteger',
               'QGemm', 'QLinearAdd', 'QLinearMul', 'QLinearSoftmax', 'QLinearGlobalAveragePool',
               'DynamicQuantizeMatMul', 'QLinearConcat', 'QLinearLeakyRelu', 'QLinearSigmoid')
THREADS = 2


def fresh_model(ckpt, **kwargs):
    import timm
    model = timm.create_model(MODEL, **kwargs)
    model.load_state_dict(load_weights(ckpt))
    return model.eval()


def torch_logits(model, x, batch=100):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def ort_session(path, level='all', optimized_path=None, profile_prefix=None, threads=THREADS):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == 'all'
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])


def ort_logits(sess, x, batch=50):
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch].numpy()})[0]
                           for i in range(0, len(x), batch)])


def op_counts(path):
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def profile_ops(path, x, calls=3):
    """Share of onnxruntime kernel time per op type over ``calls`` runs of batch ``len(x)``."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, profile_prefix=osp.join(tmp, 'prof'))
        name = sess.get_inputs()[0].name
        sess.run(None, {name: x.numpy()})
        for _ in range(calls):
            sess.run(None, {name: x.numpy()})
        prof = sess.end_profiling()
        with open(prof) as f:
            events = json.load(f)
    by_op = Counter()
    for e in events:
        if e.get('cat') == 'Node' and e.get('name', '').endswith('_kernel_time'):
            by_op[e.get('args', {}).get('op_name', '?')] += e.get('dur', 0)
    total = sum(by_op.values()) or 1
    return {op: round(100.0 * t / total, 1) for op, t in by_op.most_common(8)}


def agreement(logits, ref, y):
    pred, ref_pred = logits.argmax(1), ref.argmax(1)
    return dict(agree=float((pred == ref_pred).mean() * 100), top1=float((pred == y).mean() * 100),
                max_abs_diff=float(np.abs(logits - ref).max()))


def latency(variants, x, rounds):
    """{variant: {'bs1': median ratio, 'bs32': ..., 'bs1_ms': median ms, ...}} with ratios to
    'torch fp32 eager' in the same round."""
    names = list(variants)
    out = {n: {} for n in names}
    for bs, warm, timed in ((1, 3, 10), (32, 1, 2)):
        xb = x[:bs]
        per_round = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                fn = variants[n]
                for _ in range(warm):
                    fn(xb)
                ts = []
                for _ in range(timed):
                    t0 = time.perf_counter()
                    fn(xb)
                    ts.append(time.perf_counter() - t0)
                per_round[n].append(statistics.median(ts))
                time.sleep(0.2)
        base = per_round['torch fp32 eager']
        for n in names:
            out[n][f'bs{bs}'] = statistics.median(t / b for t, b in zip(per_round[n], base))
            out[n][f'bs{bs}_ms'] = statistics.median(per_round[n]) * 1000
    return out


def float_row(args, ckpt, val_x, y):
    """The fp32 row (torch vs the float model exported to ONNX) and the float latency variants."""
    fp_model = fresh_model(ckpt)
    fp_logits = torch_logits(fp_model, val_x).numpy()
    fp_onnx = osp.join(args.out_dir, 'fp32.onnx')
    fp_export = fresh_model(ckpt)
    for blk in fp_export.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        torch.onnx.export(fp_export, (val_x[:1],), fp_onnx, dynamo=False, opset_version=17,
                          input_names=['input'], output_names=['logits'],
                          dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})
    fp_sess = ort_session(fp_onnx)
    fp_ort = agreement(ort_logits(ort_session(fp_onnx, threads=args.eval_threads), val_x), fp_logits, y)
    records = [dict(method='fp32', bits='32/32/32', sim_top1=float((fp_logits.argmax(1) == y).mean() * 100),
                    onnx_mb=osp.getsize(fp_onnx) / 1e6, **fp_ort)]
    print(f'fp32: torch top-1 {records[0]["sim_top1"]:.2f}, ORT agreement {fp_ort["agree"]:.2f}% '
          f'max |diff| {fp_ort["max_abs_diff"]:.2e}', flush=True)
    variants = {'torch fp32 eager': lambda xb: fp_model(xb), 'ORT fp32': ort_runner(fp_sess)}

    return records, variants


def ort_runner(sess):
    name = sess.get_inputs()[0].name
    return lambda xb: sess.run(None, {name: xb.numpy()})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=osp.join(ROOT, '..', 'shared', 'data'))
    p.add_argument('--rows', default=DEFAULT_ROWS, help=f'comma list of {sorted(ROWS)}')
    p.add_argument('--state-dir', default=osp.join(ROOT, 'work_dirs', 'onnx_states'),
                   help='calibrated states <row>.safetensors (written when missing)')
    p.add_argument('--out-dir', default=osp.join(ROOT, 'work_dirs', 'onnx_export'),
                   help='where the .onnx files go')
    p.add_argument('--val-images', type=int, default=1300)
    p.add_argument('--rounds', type=int, default=5, help='latency rounds')
    p.add_argument('--skip-latency', action='store_true')
    p.add_argument('--skip-fp32', action='store_true',
                   help='no fp32 row (with --keep-rows: keep an earlier run\'s); implies --skip-latency')
    p.add_argument('--eval-threads', type=int, default=THREADS,
                   help='threads for the accuracy runs (1 on a busy machine); latency always uses 2')
    p.add_argument('--diag-images', type=int, default=200,
                   help='images for the graph-opt-off and torch-reordering agreement columns')
    p.add_argument('--image-cache', help='a .pt file caching the preprocessed evaluation images')
    p.add_argument('--arithmetic', choices=('float', 'exact'), default='float',
                   help="export_onnx's arithmetic: 'float' (QDQ around float MatMuls) or 'exact' "
                        '(MatMulInteger on the codes, the integer-exact simulation); the opt-off and '
                        'torch-running-the-export columns then compare with that simulation')
    p.add_argument('--keep-rows', action='store_true',
                   help='keep the rows (and latency) of an earlier run that this run does not redo')
    args = p.parse_args(argv)
    rows = args.rows.split(',')
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f'unknown rows {unknown}; choose from {sorted(ROWS)}')
    ckpt = osp.join(args.data, 'deit_tiny', 'deit_tiny_patch16_224.safetensors')
    for path in (ckpt, osp.join(args.data, 'imagenet', 'val1300', 'labels.txt')):
        if not osp.isfile(path):
            raise SystemExit(f'missing {path}: pass --data pointing at the shared data folder')
    os.makedirs(args.state_dir, exist_ok=True)
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(args.eval_threads)
    torch.manual_seed(0)
    t0 = time.time()
    if args.image_cache and osp.isfile(args.image_cache):
        val_x, val_y = torch.load(args.image_cache)
        val_x, val_y = val_x[:args.val_images], val_y[:args.val_images]
    else:
        val_x, val_y = load_images(osp.join(args.data, 'imagenet', 'val1300'), args.val_images)
        if args.image_cache:
            torch.save((val_x, val_y), args.image_cache + '.tmp')
            os.replace(args.image_cache + '.tmp', args.image_cache)
    y = val_y.numpy()
    print(f'loaded {len(val_x)} evaluation images in {time.time() - t0:.0f}s', flush=True)
    calib_x = None

    records, variants = [], {}
    if not args.skip_fp32:
        records, variants = float_row(args, ckpt, val_x, y)
    for name in rows:
        cfg, n_calib = ROWS[name]
        model = fresh_model(ckpt)
        spec = make_spec(**cfg)
        quantize_model(model, spec)
        state = osp.join(args.state_dir, f'{name}.safetensors')
        if osp.isfile(state):
            load_quant_state(model, state, spec)
            how = f'state {state}'
        else:
            if calib_x is None:
                calib_x, _ = load_images(osp.join(args.data, 'imagenet', 'calib1000'), 1000)
            t1 = time.time()
            CalibrationRunner(model, spec, progress=False).run(
                [calib_x[i:min(i + 100, n_calib)] for i in range(0, n_calib, 100)])
            save_quant_state(model, state, spec)
            how = f'calibrated on {n_calib} images in {time.time() - t1:.0f}s, saved {state}'
        sim = torch_logits(model, val_x).numpy()
        exact_model = copy.deepcopy(model)
        set_exact_arithmetic(exact_model)      # GEMMs on codes: the integer model's arithmetic
        integer_ref = torch_logits(exact_model, val_x).numpy()
        # what the exact graph encodes: the same, with float-input GEMMs (PTQ4ViT's patch
        # embedding) in float64; identical to the above where the model has none
        exact = integer_ref
        if args.arithmetic == 'exact':
            set_exact_arithmetic(exact_model, float_input_gemm=EXACT_FLOAT_INPUT_GEMM)
            if float64_gemms_set(exact_model):
                exact = torch_logits(exact_model, val_x).numpy()
        del exact_model
        # the exported math run by torch itself (same ops, torch kernels): how much of the ORT
        # difference is float summation order rather than the export
        torch.set_num_threads(args.eval_threads)
        arith = args.arithmetic
        ref = exact if arith == 'exact' else sim
        with export_forwards(model, arithmetic=arith):
            n_diag = min(args.diag_images, len(val_x))
            twin = agreement(torch_logits(model, val_x[:n_diag]).numpy(), ref[:n_diag], y[:n_diag])
        tag = name if arith == 'float' else f'{name}_{arith}'
        path = osp.join(args.out_dir, f'{tag}.onnx')
        t1 = time.time()
        report = export_onnx(model, val_x[:1], path, arithmetic=arith)
        export_s = time.time() - t1
        opt_path = osp.join(args.out_dir, f'{tag}.ort_optimized.onnx')
        sess = ort_session(path, optimized_path=opt_path, threads=args.eval_threads)
        t1 = time.time()
        ort_out = ort_logits(sess, val_x)
        ort_eval_s = time.time() - t1
        res = agreement(ort_out, sim, y)
        res_exact = agreement(ort_out, exact, y)
        res_integer = agreement(ort_out, integer_ref, y)
        res_noopt = agreement(ort_logits(ort_session(path, level='none', threads=args.eval_threads),
                                         val_x[:n_diag]), ref[:n_diag], y[:n_diag])
        fused = {op: c for op, c in op_counts(opt_path).items() if op in INTEGER_OPS}
        identical = int((np.abs(ort_out - exact).max(1) == 0).sum())
        qdq_left = {op: c for op, c in op_counts(opt_path).items()
                    if op in ('QuantizeLinear', 'DequantizeLinear', 'MatMul')}
        rec = dict(method=name, arithmetic=arith, identical_to_exact=identical, bits=f'{spec.w_bits}/{spec.a_bits}/{spec.attn_bits}', quant_cfg=cfg,
                   calib_images=n_calib, state=how, diag_images=n_diag, sim_top1=float((sim.argmax(1) == y).mean() * 100),
                   **res, exact_sim_top1=float((exact.argmax(1) == y).mean() * 100),
                   agree_exact=res_exact['agree'], max_abs_diff_exact=res_exact['max_abs_diff'],
                   agree_integer=res_integer['agree'],
                   exact_float_input_gemm=exact is not integer_ref,
                   noopt_max_abs_diff=res_noopt['max_abs_diff'],
                   noopt_agree=res_noopt['agree'], torch_export_forwards_agree=twin['agree'],
                   torch_export_forwards_max_abs_diff=twin['max_abs_diff'], onnx_mb=osp.getsize(path) / 1e6,
                   export_seconds=export_s, ort_eval_seconds=ort_eval_s, export_forms=report.summary(),
                   fused_integer_ops=fused, remaining_ops=qdq_left)
        if not args.skip_latency and not args.skip_fp32:
            rec['profile_bs32'] = profile_ops(path, val_x[:32])
        records.append(rec)
        print(f'{name}: sim top-1 {rec["sim_top1"]:.2f}, ORT top-1 {res["top1"]:.2f}, agreement '
              f'{res["agree"]:.2f}% (integer-exact simulation: {res_exact["agree"]:.2f}%), max |diff| {res["max_abs_diff"]:.3g} (no graph opt, first {n_diag} images: '
              f'{res_noopt["max_abs_diff"]:.3g}; torch running the exported ops: agreement '
              f'{twin["agree"]:.2f}%, max |diff| {twin["max_abs_diff"]:.3g}), {rec["onnx_mb"]:.2f} MB, fused {fused} ({how})',
              flush=True)
        variants[f'ORT {name}' + ('' if arith == 'float' else f' ({arith})')] = ort_runner(ort_session(path))
        del model
        save(args, argv, val_x, records, None)       # rows so far (latency comes last)
    lat = None
    if not args.skip_latency and not args.skip_fp32:
        torch.set_num_threads(THREADS)
        lat = latency(variants, val_x[:32], args.rounds)
        for n, v in lat.items():
            print(f'latency {n}: bs1 {v["bs1"]:.2f}x ({v["bs1_ms"]:.0f} ms), '
                  f'bs32 {v["bs32"]:.2f}x ({v["bs32_ms"]:.0f} ms)', flush=True)
    save(args, argv, val_x, records, lat)


def save(args, argv, val_x, records, lat):
    if getattr(args, 'keep_rows', False):
        old = load_result('onnx_export.json')
        if old and old.get('val_images') == len(val_x):
            def key(r):
                return r['method'], r.get('arithmetic', 'float')
            done = {key(r) for r in records}
            records = [r for r in old['records'] if key(r) not in done] + records
            records.sort(key=lambda r: (r.get('arithmetic', 'float') != 'float', r['method'] != 'fp32',
                                        list(ROWS).index(r['method']) if r['method'] in ROWS else 0))
            lat = {**(old.get('latency') or {}), **(lat or {})} or None
    command = 'python benchmarks/onnx_export.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    if getattr(args, 'keep_rows', False):
        old = load_result('onnx_export.json') or {}
        commands = old.get('commands') or ([old['command']] if old.get('command') else [])
        commands = [c for c in commands if c != command] + [command]
    else:
        commands = [command]
    doc = dict(command=command, commands=commands,
               machine=machine_info(), date=datetime.date.today().isoformat(),
               val_images=len(val_x), onnxruntime=__import__('onnxruntime').__version__,
               load_average=os.getloadavg(), records=records, latency=lat)
    save_result('onnx_export.json', doc)


def pct(v):
    return '–' if v is None else f'{v:.2f} %'


def onnx_section(doc):
    """RESULTS.md section for benchmarks/results/onnx_export.json."""
    lat = doc.get('latency') or {}
    n_diag = next((r['diag_images'] for r in doc['records'] if 'diag_images' in r), 200)
    out = ['## ONNX export: DeiT-Tiny (real weights) in onnxruntime vs our simulated model', '',
           'Commands: ' + ', '.join(f'`{c}`' for c in doc.get('commands') or [doc['command']]) + '  ',
           f'Machine: {doc["machine"]}, onnxruntime {doc["onnxruntime"]} (CPUExecutionProvider, '
           f'ORT_ENABLE_ALL, 2 intra-op threads); date {doc["date"]}; load average during the run '
           f'{", ".join(f"{v:.1f}" for v in doc["load_average"])} (latency is contended when > 2).  ',
           f'{doc["val_images"]} `imagenet/val1300` images. Agreement = same top-1 class as our simulated '
           'model (for fp32: as torch). Latency = ratio to torch fp32 eager in the same round (median '
           'over rounds; < 1 is faster).', '',
           '| model | arithmetic | bits (W/A/attn) | simulated top-1 | ORT top-1 | top-1 agreement | agreement with the '
           'integer-exact simulation | logits identical to it | agreement with the integer model | max abs logit diff '
           f'| agreement, ORT graph opt. off (first {n_diag}) | agreement, torch running the exported ops '
           f'(first {n_diag}) '
           '| ONNX MB | fused integer ops (ORT) | latency bs1 | latency bs32 |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    lat_rows = {'fp32': 'ORT fp32'}
    for r in doc['records']:
        arith = r.get('arithmetic', 'float')
        key = lat_rows.get(r['method'], f'ORT {r["method"]}' + ('' if arith == 'float' else f' ({arith})'))
        lv = lat.get(key, {})
        fused = ', '.join(f'{k} {v}' for k, v in r.get('fused_integer_ops', {}).items()) or '—'
        ident = r.get('identical_to_exact')
        out.append(f'| {r["method"]} | {arith if r["method"] != "fp32" else "–"} | {r["bits"]} | '
                   f'{r["sim_top1"]:.2f} | {r["top1"]:.2f} | '
                   f'{r["agree"]:.2f} % | {pct(r.get("agree_exact"))} | '
                   f'{"–" if ident is None else ident} | '
                   f'{pct(r.get("agree_integer")) if r.get("exact_float_input_gemm") else "same"} | '
                   f'{r["max_abs_diff"]:.3g} | '
                   f'{pct(r.get("noopt_agree"))} | '
                   f'{pct(r.get("torch_export_forwards_agree"))} | {r["onnx_mb"]:.2f} | {fused} | '
                   + (f'{lv["bs1"]:.2f}× | {lv["bs32"]:.2f}× |' if lv else '– | – |'))
    if lat:
        t = lat['torch fp32 eager']
        out += ['', f'torch fp32 eager medians: bs1 {t["bs1_ms"]:.0f} ms, bs32 {t["bs32_ms"]:.0f} ms.']
    notes = [
        'Arithmetic "exact" (`export_onnx(..., arithmetic=\'exact\')`, `tools/export_onnx.py --arithmetic '
        'exact`): the graph of the integer-exact simulation (`tools/test.py --exact-arithmetic`, the '
        'arithmetic of the integer model): every quantized Linear / patch convolution on a per-tensor '
        'grid is MatMulInteger on the codes (PTQ4ViT\'s twin-uniform fc2 input: two) followed by Cast, '
        'Mul Δ_x·Δ_w, Add bias; QKᵀ and P·V on codes; log-coded probabilities with exact code '
        'thresholds; GELU as the rational erf both sides evaluate bit for bit. Its reference is that '
        'simulation: "agreement with the integer-exact simulation" and "logits identical to it" are the '
        'columns to read; the opt-off and torch columns of exact rows compare with it too. A quantized '
        'layer on a float input (PTQ4ViT\'s patch embedding: the image is not quantized) is a float64 '
        'MatMul in the graph and in that reference (`set_exact_arithmetic(..., '
        'float_input_gemm=\'float64\')`): float32 sums would depend on the kernel\'s order. The integer '
        'model keeps that GEMM in float32 (float64 costs ~20 % at batch 32); "agreement with the integer '
        'model" compares with it ("same" where the model has no such layer). What still differs: float '
        'LayerNorm (RepQ-ViT, PTQ4ViT) and Softmax kernels.',
        'Uniform quantizers are QuantizeLinear/DequantizeLinear pairs (uint8 activations per tensor, PTF '
        'per channel; a b < 8-bit grid is the uint8 container with a Clip before QuantizeLinear); weights are '
        'int8 initializers + DequantizeLinear (per channel); log2 / log√2 / AdaLog / twin uniform / '
        'Log-Int-Softmax and the FQ-ViT integer LayerNorm are standard ONNX ops (fqvit_det/export/onnx.py).',
        'Each quantizer alone is bit-exact in onnxruntime (uniform QDQ, twin uniform, Log-Int-Softmax, '
        'integer LayerNorm; log-coded ones since their codes are corrected against exact thresholds; '
        'tests/test_onnx_export.py). The float rows\' latency and op profiles are from the first '
        'command (before those thresholds and the power-of-two tables), their agreement columns from '
        'the last. In the float export '
        'what differs is the float kernels between quantizers (LayerNorm, Softmax, GELU, MatMul summation '
        'order; with ORT_ENABLE_ALL the fused integer kernels): a difference of one float ulp that lands '
        'on a rounding tie moves a value by a whole quantization step, and at 4 bits with a float '
        'residual stream (RepQ-ViT) these flips multiply block by block. The column "torch running the '
        'exported ops" measures that sensitivity without onnxruntime: the same model in torch with '
        'matmul(x, Wᵀ) instead of F.linear and the export\'s op order.',
        'Peers on the same work (shared/reference/peers_int8.md, contended too): ORT static QDQ int8 '
        '0.35–0.37× (bs1) / 0.57–0.59× (bs32) at 80.77–81.08 top-1; ORT dynamic per-channel 0.25× / '
        '0.51× at 81.54; ORT fp32 0.47× / 0.88× (Bench A).',
    ]
    out += [''] + [f'- {n}' for n in notes]
    for r in doc['records']:
        if r.get('profile_bs32'):
            out.append(f'- {r["method"]}: ORT kernel time by op at bs32 (%): '
                       + ', '.join(f'{k} {v}' for k, v in r['profile_bs32'].items()))
    return '\n'.join(out)


if __name__ == '__main__':
    main()
