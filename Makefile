# The two commands of the quick start: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch only serves the export tools and the parity tests; pinned so pip never pulls a newer CUDA build
TORCH_VERSION ?= 2.13.0

.PHONY: demo test lint reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: setup.py $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu]'
	touch $@

$(VENV)/.dev: setup.py $(VENV)/.runtime
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e '.[cpu,export,camera,dev]'
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/wam-edge demo --report reports/demo.json

lint: $(VENV)/.dev
	$(BIN)/ruff check runtime tools tests
	$(BIN)/vermin -q --no-tips --violations --eval-annotations -t=3.8- runtime

test: lint
	$(BIN)/python -m pytest -q

# regenerate exported/reference/ from tools/reference_model.py (fixed seed)
reference: $(VENV)/.dev
	$(BIN)/python -m tools.make_reference

clean:
	rm -rf $(VENV) reports .pytest_cache
