# The two commands of a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint venv venv-test clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-tpu.txt
	$(PY) -m pip install -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

# The paper's comparison (scratch vs pre-trained + fine-tuned) on the embedded synthetic default.
demo: $(VENV)/.installed
	$(PY) -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/compare

# Lint and format check (ruff, configured in pyproject.toml), then the whole test suite, with timings.
test: lint
	$(PY) -m pytest tests -n 2 --dist loadfile

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check rethink_jax scripts tests configs
	$(VENV)/bin/ruff format --check rethink_jax scripts tests configs

clean:
	rm -rf runs .pytest_cache
