# One-command set-up: `make demo` (synthetic data: search, train, test) and `make test`.
# The environment is a virtualenv in .venv that sees system packages, so a PyTorch you
# already have (e.g. a CUDA build) is used as it is; one is installed only if none imports.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
RUFF := $(PY) -m ruff
# Test tools; onnx and onnxruntime are optional extras of `utils.export --onnx`, faiss-cpu of
# `utils.gallery search --approximate`, that the tests use.
TEST_TOOLS := pytest "ruff==0.17.6" "onnx>=1.16" "onnxruntime>=1.18" "faiss-cpu>=1.8"
RUFF_ARGS := --line-length 100
# The suite writes many checkpoints: keep the folders of failed tests only.
PYTEST_ARGS := -o tmp_path_retention_policy=failed
LINT_RULES := E,F,W,I,B,UP,N,SIM --ignore N818 --config "lint.isort.known-first-party = ['data', 'model', 'utils']"

.PHONY: all setup demo test lint format clean

all: test

$(VENV)/.installed: requirements.txt Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet $(TEST_TOOLS)
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(RUFF) check $(RUFF_ARGS) --select $(LINT_RULES) .
	$(RUFF) format $(RUFF_ARGS) --check .

format: setup
	$(RUFF) check $(RUFF_ARGS) --select $(LINT_RULES) --fix .
	$(RUFF) format $(RUFF_ARGS) .

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: setup
	$(PY) -m utils.demo --out $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
