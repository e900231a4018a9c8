# The two README commands. Both install the pinned stack into .venv/ first (a no-op when unchanged).
# `make test` includes tests/test_packaging.py: the wheel's contents and its imports in a fresh venv
# with only the declared dependencies (no download; `make wheel-check` runs just that).
PY := .venv/bin/python

.PHONY: install demo test wheel-check gpu-check

install:
	bash tools/install.sh

demo: install
	$(PY) tools/main_job.py

test: install
	$(PY) -m pytest -q tests

wheel-check: install
	$(PY) -m pytest -q tests/test_packaging.py

gpu-check: install
	bash benchmarks/gpu_check.sh
