"""Benchmark result files: benchmarks/results/*.json (atomic writes) rendered into RESULTS.md."""
import glob
import json
import os
import os.path as osp
import platform

HERE = osp.dirname(osp.abspath(__file__))


def load_result(name):
    """The JSON document ``benchmarks/results/<name>``, or ``None`` when there is none yet."""
    path = osp.join(HERE, 'results', name)
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_result(name, doc):
    """Write ``benchmarks/results/<name>`` atomically, then re-render RESULTS.md."""
    path = osp.join(HERE, 'results', name)
    with open(path + '.tmp', 'w') as f:
        json.dump(doc, f, indent=1)
    os.replace(path + '.tmp', path)
    return render()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def machine_info():
    import torch
    return (f'{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPU cores, '
            f'torch {torch.__version__}, {torch.get_num_threads()} threads')


def cls_section(doc):
    rows = doc['records']
    out = ['## Classification fidelity: DeiT-Tiny (real weights), ImageNet',
           '',
           'Commands (each row names the one that produced it in the JSON): '
           + ', '.join(f'`{c}`' for c in doc.get('commands', [doc.get('command')])) + '  ',
           f'Machine: {doc["machine"]}; date {doc["date"]}.  ',
           f'Calibration images from `imagenet/calib1000`, evaluation on {doc["val_images"]} images of '
           '`imagenet/val1300` (resize 248 bicubic, center crop 224). Drop = float top-1 − quantized '
           'top-1 on the same images.',
           '',
           '| model | method | bits (W/A/attn) | calib images | top-1 | top-5 | drop | target | calib s | eval s | float eval s |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        target = r.get('target_drop')
        status = '' if target is None else (f'≤ {target} ✓' if r['drop'] <= target else f'≤ {target} ✗')
        out.append(f'| {r.get("family", "timm (own loop)")} | {r["method"]} | {r["bits"]} | {r["calib_images"]} | {r["top1"]:.2f} | '
                   f'{r["top5"]:.2f} | {r["drop"]:.2f} | {status} | {r["calib_seconds"]:.1f} | '
                   f'{r["eval_seconds"]:.1f} | {r["fp_eval_seconds"]:.1f} |')
    out += notes_md(doc)
    return '\n'.join(out)


def notes_md(doc):
    """A section's ``notes`` as markdown bullets after a blank line (nothing without notes)."""
    return [''] + [f'- {n}' for n in doc['notes']] if doc.get('notes') else []


def det_section(doc):
    out = ['## Detection: coco_mini', '', f'Machine: {doc["machine"]}; date {doc["date"]}.', '']
    out += doc.get('markdown', [])
    out += notes_md(doc)
    diag = doc.get('sqnr_diagnosis')
    if diag:
        out += ['', '### Why the backbone-feature SQNR is low: per-block SQNR of real DeiT-Tiny on COCO images', '',
                f'Command: `{diag["command"]}` ({diag["size"]}×{diag["size"]} input, calibrated on '
                f'{diag["calib_images"]} train2017 images, measured on {diag["test_images"]} val2017 images; '
                'residual stream after each block, then the final features).', '',
                '| variant | final features dB | after block 1, 2, …, 12 (dB) |', '|---|---|---|']
        for r in diag['rows']:
            out.append(f'| {r["variant"]} | {r["final_db"]:.1f} | '
                       + ', '.join(f'{v:.1f}' for v in r['blocks_db']) + ' |')
    return '\n'.join(out)


def speed_section(doc):
    out = ['## Speed: calibration and simulated quantized inference vs float (DeiT-Tiny, CPU)', '',
           f'Command: `{doc["command"]}`  ', f'Machine: {doc["machine"]}; date {doc["date"]}.  ',
           f'{doc["images"]} pre-loaded images in batches of 100 (no data loading in the timings); '
           f'float forward {doc["float_seconds"]:.1f} s. Observer calibration without layer search. '
           'Targets: calibration ≤ ~1.5×, quantized inference ≤ ~1.3×.', '',
           '| method | chunk kernel threads | calibration / float | quantized forward / float |',
           '|---|---|---|---|']
    for r in doc['rows']:
        threads = 'caller\'s (None)' if r['chunk_threads'] is None else str(r['chunk_threads'])
        out.append(f'| {r["method"]} | {threads} | {r["calib_ratio"]:.2f} | {r["quant_ratio"]:.2f} |')
    return '\n'.join(out)


def integer_section(doc):
    out = ['## Integer execution: integer DeiT-Tiny vs the simulated model (issue 8)', '',
           f'Machine: {doc["machine"]}; date {doc["date"]}.  ',
           'Commands: ' + ', '.join(f'`{c}`' for c in dict.fromkeys(
               c for r in doc['records'] for c in (r['command'], r.get('size_command')) if c)) + '  ',
           f'Agreement = same top-1 class on {doc["val_images"]} `val1300` images as the integer-exact '
           'simulation (GEMMs on codes, `tools/test.py --exact-arithmetic`; the same calibrated state) '
           'and as the default float32 simulation (GEMMs on dequantized values); export = '
           '`save_integer` safetensors (code tensors Huffman-coded, the default) vs the float32 '
           'safetensors file; "plain" = `save_integer(..., entropy_coding=False)`. Rows without the float32 '
           'columns are from before the integer-exact simulation existed (their agreement is with '
           'the float32 simulation, on the images given).', '',
           '| preset | bits W/A/attn | requant | integer GEMMs | agree % (exact sim) | differ | '
           'max logit diff | agree % (float32 sim) | exact sim top-1 | float32 sim top-1 | int top-1 '
           '| export MB | x smaller | plain MB | x smaller (plain) | reload identical |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in doc['records']:
        f32 = 'agree_f32_pct' in r
        out.append(f'| {r["preset"]} | {r["bits"]} | {r.get("requant", "dyadic")} | {r["integer_gemms"]} | '
                   + (f'{r["agree_pct"]:.2f} | {r["disagree"]} | {r["max_logit_diff"]:.4f} | '
                      f'{r["agree_f32_pct"]:.2f} | {r["sim_top1"]:.2f} | {r["sim_f32_top1"]:.2f} | '
                      if f32 else
                      f'– | – | – | {r["agree_pct"]:.2f} ({r["images"]} images) | – | '
                      f'{r["sim_top1"]:.2f} | ')
                   + f'{r["int_top1"]:.2f} | {r["export_bytes"] / 1e6:.2f} | {r["size_ratio"]:.2f} | '
                   + (f'{r["export_bytes_plain"] / 1e6:.2f} | {r["size_ratio_plain"]:.2f} | '
                      if 'export_bytes_plain' in r else '– | – | ')
                   + f'{r["reload_bit_identical"]} |')
    out += ['', 'Where differences start (first 16 images): max |residual-stream difference| after each '
            'block (relative to the block output\'s max |value|).', '',
            '| preset | block 1 … 12 |', '|---|---|']
    for r in doc['records']:
        out.append(f'| {r["preset"]} | ' + ', '.join(f'{b["max_abs"]:.3g} ({b["rel"]:.1e})'
                                                      for b in r['block_divergence']) + ' |')
    out += notes_md(doc)
    ident = load_result('integer_kernels_identity.json')
    if ident:
        amx = ident.get('kernels', {}).get('amx')
        out += ['', '### Compiled CPU kernels vs torch ops: the same logits', '',
                f'Command: `{ident["command"]}`  ', f'Machine: {ident["machine"]}; date {ident["date"]}'
                + ('' if amx is None else f'; int8 GEMMs of the compiled path on AMX tiles: '
                   f'{"yes" if amx else "no"}'), '',
                '| preset | images | identical logits | max abs logit diff | compiled s | torch ops s '
                '| replayed: identical to eager | replayed batches (fallbacks) | replayed s |',
                '|---|---|---|---|---|---|---|---|---|']
        out += [f'| {r["preset"]} | {r["images"]} | {r["identical_images"]} | {r["max_logit_diff"]:g} '
                f'| {r["seconds_compiled"]:.1f} | {r["seconds_torch_ops"]:.1f} '
                f'| {r.get("identical_images_replayed", "–")} '
                f'| {r.get("replayed_batches", "–")} ({r.get("replay_fallbacks", "–")}) '
                + (f'| {r["seconds_replayed"]:.1f} |' if 'seconds_replayed' in r else '| – |')
                for r in ident['rows']]
    peers = load_result('ort_peers.json')
    if peers:
        out += ['', ort_peers_section(peers)]
    for path in sorted(glob.glob(osp.join(HERE, 'results', 'integer_speed*.json'))):
        out += ['', integer_speed_section(load_result(osp.basename(path)))]
    return '\n'.join(out)


def ort_peers_section(doc):
    r = doc['recipe']
    out = ['### onnxruntime int8 peers built on this machine', '',
           f'Command: `{doc["command"]}`  ', f'Machine: {doc["machine"]}; date {doc["date"]}; '
           f'onnxruntime {doc["onnxruntime"]}. timm\'s float DeiT-Tiny exported to ONNX, then '
           f'{r["static"]} ({r["calib_images"]} images, {r["calib_order"]}); {r["dynamic"]}. '
           'Their latency is in the integer speed sections run with `--peers`.', '',
           '| peer | top-1 (val1300) | images | file MB |', '|---|---|---|---|']
    out += [f'| {x["peer"]} | {x["top1"]:.2f} | {x["images"]} | {x["file_bytes"] / 1e6:.2f} |'
            for x in doc['rows']]
    return '\n'.join(out)


def integer_speed_section(doc):
    alloc = doc.get('allocator', 'default')
    title = ('glibc malloc keeping freed memory' if alloc == 'tuned' else 'default glibc malloc')
    kern = doc.get('kernels')
    cpu = f', {doc["tag"]}' if doc.get('tag') else ''
    out = [f'### Integer model speed vs float (DeiT-Tiny, CPU{cpu}, {title})', '',
           f'Command: `{doc["command"]}`  ', f'Machine: {doc["machine"]}; date {doc["date"]}; '
           f'{doc["threads"]} threads; {doc["note"]}'
           + (f'; GLIBC_TUNABLES={doc["glibc_tunables"]}' if doc.get('glibc_tunables') else '')
           + (f'; compiled kernels: {"yes" if kern["compiled"] else "no"}' if kern else '')
           + (f'; int8 GEMMs on AMX tiles: {"yes" if kern["amx"] else "no"}'
              if kern and 'amx' in kern else ''), '',
           '| model | batch | median ms | ratio to float eager (median of per-round ratios) |',
           '|---|---|---|---|']
    for r in doc['rows']:
        out.append(f'| {r["variant"]} | {r["batch"]} | {r["median_ms"]:.1f} | {r["ratio"]:.3f} |')
    for prof in doc.get('profiles', []):
        out += ['', f'Profile: {prof["variant"]}, batch {prof["batch"]} (self CPU time, top ops; '
                'ops called inside the compiled attention\'s parallel tasks (`_int_mm`, `log2`, '
                '`_softmax`) add up the time of both threads)', '',
                '| op | self ms | % |', '|---|---|---|']
        out += [f'| `{o["op"]}` | {o["ms"]:.2f} | {o["pct"]:.1f} |' for o in prof['ops']]
    return '\n'.join(out)


def render():
    parts = ['# Benchmark results', '',
             'Produced by the scripts in `benchmarks/`; each section names the command that wrote it. '
             'Numbers are measured on the CPU machine named in each section.', '']
    cls = load_result('cls_fidelity.json')
    if cls:
        parts += [cls_section(cls), '']
    speed = load_result('cls_speed.json')
    if speed:
        parts += [speed_section(speed), '']
    integer = load_result('integer_agreement.json')
    if integer:
        parts += [integer_section(integer), '']
    det = load_result('det_benchmark.json')
    if det:
        parts += [det_section(det), '']
    yolox = load_result('yolox_benchmark.json')
    if yolox:
        import sys
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        from yolox_benchmark import yolox_section
        parts += [yolox_section(yolox), '']
    dyn = load_result('vit_block_sqnr.json')
    if dyn:
        import sys
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        from vit_block_sqnr import dyn_section
        parts += [dyn_section(dyn, load_result('cls_screen_dyn.json')), '']
    onnx_doc = load_result('onnx_export.json')
    if onnx_doc:
        import sys
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        from onnx_export import onnx_section
        parts += [onnx_section(onnx_doc), '']
    path = osp.join(HERE, 'RESULTS.md')
    with open(path + '.tmp', 'w') as f:
        f.write('\n'.join(parts))
    os.replace(path + '.tmp', path)
    return path


if __name__ == '__main__':
    print(render())
