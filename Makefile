# The two commands a newcomer needs: `make demo` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= $(or $(DREAMOMNI2_PORT),8000)

.PHONY: setup demo test up lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
	touch $@

# `make demo KEEP=1` keeps the stack up after the edit (until Ctrl-C), to try the web page it prints.
demo: setup
	$(PY) -m app.demo $(if $(filter-out 0 false,$(KEEP)),--keep)

test: setup
	$(PY) -m pytest

up: setup
	$(PY) -m app.stack --port $(PORT)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) bench/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
