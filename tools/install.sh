#!/usr/bin/env bash
# Creates .venv/ inside the clone and installs the pinned stack plus fqvit-det (editable).
# Idempotent: a stamp keyed on this script, requirements.txt and setup.py makes a re-run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.fqvit-install-stamp
want=$(cat tools/install.sh requirements.txt setup.py 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[install] creating $VENV and installing the pinned stack (first run: ~30-40 min, mostly building mmcv ops)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip==24.2" "setuptools==80.9.0" "wheel==0.44.0"
# torch===2.13.0 (arbitrary equality) skips the machine-local +cpu wheel: torchvision exists only as
# CUDA builds, and those need the matching CUDA torch build (which runs fine on a CPU-only machine).
# (the registry's torch 2.13.0 CUDA wheel reports torch.__version__ '2.12.1+cu130': check the
# installed distribution's metadata, not __version__)
if ! $VENV/bin/python -c "from importlib.metadata import version as v; import torch, torchvision; assert v('torch') == '2.13.0' and v('torchvision') == '0.28.0'" 2>/dev/null; then
  $PIP install -q "torch===2.13.0" "torchvision===0.28.0"
fi
$PIP install -q -r requirements.txt
# mmcv 2.1.0 has no reachable wheel: build its compiled ops from source against the installed torch.
# The wheel is kept in a folder keyed by the exact torch build (a wheel compiled against another
# torch has a different C++ ABI and fails at run time), so a rebuild happens only when torch changes.
MMCV_OK="import torch, mmcv; from mmcv.ops import nms; assert mmcv.__version__ == '2.1.0'; b = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.]]); nms(b, torch.tensor([0.9, 0.8]), 0.5)"
if ! $VENV/bin/python -c "$MMCV_OK" 2>/dev/null; then
  TORCH_TAG=$($VENV/bin/python -c "import torch; print(torch.__version__.replace('+', '_'))")
  WHEELS=${FQVIT_WHEEL_CACHE:-$HOME/.cache/fqvit-det}/mmcv-2.1.0-torch-$TORCH_TAG
  if ! ls "$WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    echo "[install] building mmcv 2.1.0 ops against torch $TORCH_TAG (about 25 min on 2 cores)"
    mkdir -p "$WHEELS"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} FORCE_CUDA=0 \
      $PIP wheel --no-build-isolation --no-deps --no-cache-dir -w "$WHEELS.tmp" "mmcv==2.1.0"
    mv "$WHEELS.tmp"/mmcv-2.1.0-*.whl "$WHEELS"/ && rm -rf "$WHEELS.tmp"
  fi
  $PIP install -q --no-deps --force-reinstall "$WHEELS"/mmcv-2.1.0-*.whl
  $VENV/bin/python -c "$MMCV_OK" || { echo "[install] mmcv ops do not work with this torch" >&2; exit 1; }
fi
$PIP install -q --no-build-isolation --no-deps -e .
$VENV/bin/python -c "import torch, torchvision, mmcv.ops, mmdet, timm, fqvit_det; print('[install] ok: torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'timm', timm.__version__)"
echo "$want" > "$STAMP"
