# The two README commands. Both install the pinned stack into .venv/ first (a no-op when unchanged).
PY := .venv/bin/python

.PHONY: install demo test

install:
	bash tools/install.sh

demo: install
	$(PY) tools/main_job.py

test: install
	$(PY) -m pytest -q tests
