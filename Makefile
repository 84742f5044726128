# `make demo` and `make test` set everything up by themselves; a second run reuses .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench soak clean

$(STAMP): pyproject.toml setup.py requirements-dev.txt src/goplug/_fastpath.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m compileall -q src
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/goplug demo

test: $(STAMP) lint
	-@tools/ensure-go >/dev/null
	$(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick,)

soak: $(STAMP)
	$(PY) -m goplug.soak $(if $(SOAK_SECONDS),--seconds $(SOAK_SECONDS),)

clean:
	rm -rf $(VENV) build src/*.egg-info src/goplug/*.so .pytest_cache .mypy_cache .ruff_cache
