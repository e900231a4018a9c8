#!/usr/bin/env bash
# Device check (issue 10 item 10): the quantizer and classification tests with their models on CUDA
# (FQVIT_TEST_DEVICE=cuda, the `device` fixture of tests/conftest.py), then one calibration of a
# small ViT per method on CUDA, compared with the same calibration on the CPU.
#
#   bash benchmarks/gpu_check.sh            (or: make gpu-check)
#
# Needs an NVIDIA GPU visible to torch; without one it stops at once with exit code 2.
# Writes its log and a one-screen summary to ${GPU_CHECK_OUT:-work_dirs/gpu_check}/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${GPU_CHECK_OUT:-work_dirs/gpu_check}
mkdir -p "$OUT"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: FAILED: no CUDA device (torch.cuda.is_available() is False for $PY)." >&2
  echo "gpu_check: this check needs an NVIDIA GPU; nothing was run." >&2
  exit 2
fi
export FQVIT_TEST_DEVICE=cuda PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'on', torch.cuda.get_device_name(0))" | tee "$OUT/summary.txt"

status=0
# 1. Quantizer and classification tests on CUDA.
t0=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider tests/quantizers tests/test_convert_cls.py tests/test_cls_e2e.py \
  tests/test_cls_configs.py tests/test_validation.py > "$OUT/pytest.log" 2>&1 || status=1
echo "gpu_check: tests on cuda: $(tail -n 1 "$OUT/pytest.log") ($(( $(date +%s) - t0 ))s; log $OUT/pytest.log)" \
  | tee -a "$OUT/summary.txt"

# 2. One calibration per method of a small ViT on CUDA, against the same calibration on the CPU.
"$PY" - > "$OUT/calibration.log" 2>&1 <<'EOF' || status=1
import time

import torch

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.presets import make_spec
from tests.helpers import images, tiny_vit


def calibrate(method, device):
    model = tiny_vit().to(device)
    x = images(model, 16).to(device)
    with torch.no_grad():
        ref = model(x)
    spec = make_spec(method, 8, 8)
    quantize_model(model, spec)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.time()
    CalibrationRunner(model, spec, progress=False).run([x[:8], x[8:]])
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.time() - t0
    with torch.no_grad():
        out = model(x)
    off = sorted({f'{n} on {t.device}' for n, t in list(model.named_buffers()) + list(model.named_parameters())
                  if t.device.type != device.type})
    return ref, out, seconds, off


failed = False
for method in ('fqvit', 'ptq4vit', 'repq', 'adalog'):
    ref, out, seconds, off = calibrate(method, torch.device('cuda'))
    _, out_cpu, seconds_cpu, _ = calibrate(method, torch.device('cpu'))
    sqnr = (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()
    gap = (out.cpu() - out_cpu).abs().max().item() / out_cpu.abs().max().item()
    ok = bool(torch.isfinite(out).all()) and not off and sqnr > 10
    failed |= not ok
    print(f'{method:8s} cuda calibration {seconds:6.2f}s (cpu {seconds_cpu:6.2f}s) | output SQNR vs float '
          f'{sqnr:5.1f} dB | max |cuda - cpu| / max|cpu| = {gap:.2e} | '
          f'{"ok" if ok else "FAILED"}{" (tensors off the GPU: " + ", ".join(off[:3]) + ")" if off else ""}')
raise SystemExit(1 if failed else 0)
EOF
sed 's/^/gpu_check: /' "$OUT/calibration.log" | tee -a "$OUT/summary.txt"

# 3. Integer execution (issue 8) on CUDA: the integer kernel tests with their models on the GPU,
#    then a tiny ViT converted by to_integer on CUDA against the same conversion on the CPU.
#    (Written without a GPU at hand: unverified until this script runs on one.)
t0=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider tests/integer -k "not tools_test" > "$OUT/integer_pytest.log" 2>&1 || status=1
echo "gpu_check: integer tests on cuda: $(tail -n 1 "$OUT/integer_pytest.log") ($(( $(date +%s) - t0 ))s; log $OUT/integer_pytest.log)" \
  | tee -a "$OUT/summary.txt"
"$PY" - > "$OUT/integer.log" 2>&1 <<'EOF' || status=1
import torch

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.integer import to_integer
from fqvit_det.presets import make_spec
from tests.helpers import images, tiny_vit

failed = False
for cfg in (dict(method='fqvit', w_bits=8, a_bits=8, attn_bits=4), dict(method='repq', w_bits=4, a_bits=4),
            dict(method='ptq4vit', w_bits=6, a_bits=6, search=None)):
    model = tiny_vit()
    x = images(model, 8)
    spec = make_spec(**cfg)
    quantize_model(model, spec)
    CalibrationRunner(model, spec, progress=False).run([x[:4], x[4:]])
    with torch.no_grad():
        cpu = to_integer(model)(x)
        gpu = to_integer(model.cuda())(x.cuda()).cpu()
        sim = model(x.cuda()).cpu()
    same = bool((cpu.argmax(1) == gpu.argmax(1)).all() and (sim.argmax(1) == gpu.argmax(1)).all())
    gap = (cpu - gpu).abs().max().item()
    failed |= not same
    print(f'{cfg["method"]:8s} integer on cuda: top-1 equal to cpu and simulation {same} | '
          f'max |cuda - cpu| {gap:.2e} | {"ok" if same else "FAILED"}')
raise SystemExit(1 if failed else 0)
EOF
sed 's/^/gpu_check: /' "$OUT/integer.log" | tee -a "$OUT/summary.txt"

if [ $status -eq 0 ]; then
  echo "gpu_check: PASSED" | tee -a "$OUT/summary.txt"
else
  echo "gpu_check: FAILED (see $OUT/pytest.log, $OUT/calibration.log, $OUT/integer*.log)" | tee -a "$OUT/summary.txt"
fi
exit $status
