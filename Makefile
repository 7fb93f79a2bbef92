# The two commands of the quick start: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch only serves the export tools and the parity tests; pinned so pip never pulls a newer CUDA build
TORCH_VERSION ?= 2.13.0

# the runtime must also run on JetPack 5: Python 3.8 with numpy 1.x (found here via PATH or pyenv, if present)
PYTHON38 ?= $(shell for p in $(HOME)/.pyenv/versions/3.8*/bin/python3.8 python3.8; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 8)' 2>/dev/null && { command -v $$p; break; }; done)
VENV38 ?= .venv38

.PHONY: demo demo-dds bench test test-py38 lint reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: setup.py $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu]'
	touch $@

$(VENV)/.dev: setup.py $(VENV)/.runtime
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e '.[cpu,export,camera,bench,dev]'
	touch $@

# the DDS link's Python binding (cyclonedds 0.10.2), built against the CycloneDDS C library (Debian cyclonedds-dev)
$(VENV)/.dds: tools/install_dds.sh $(VENV)/.runtime
	tools/install_dds.sh $(VENV)
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/wam-edge demo --report reports/demo.json

# the same loop with the controller speaking DDS to a simulated G1 in its own process (on loopback)
demo-dds: $(VENV)/.dds
	$(BIN)/wam-edge demo --set controller.driver=dds --report reports/demo-dds.json

# the loop under injected inference latencies (10 ms, 100 ms, 80% of a chunk): JSON report and PNG plot
$(VENV)/.bench: setup.py $(VENV)/.runtime
	$(BIN)/pip install -q -e '.[cpu,bench]'
	touch $@

bench: $(VENV)/.bench
	$(BIN)/wam-edge bench --report reports/bench.json

# vermin: runtime/ and the tools that run on the robot (JetPack 5 is Python 3.8): build, verify, golden data
lint: $(VENV)/.dev
	$(BIN)/ruff check runtime tools tests
	$(BIN)/vermin -q --no-tips --violations --eval-annotations -t=3.8- runtime tools/build_engine.py tools/verify.py tools/golden.py

test: lint $(VENV)/.dds
	$(BIN)/python -m pytest -q
	$(MAKE) test-py38

# the runtime's tests on Python 3.8 + numpy 1.x (torch-based parity tests skip there: torch is for tools/ only)
test-py38:
ifeq ($(PYTHON38),)
	@echo "test-py38: no python3.8 found; skipping the Python 3.8 + numpy 1.x run (set PYTHON38=...)"
else
	test -x $(VENV38)/bin/python || $(PYTHON38) -m venv $(VENV38)
	$(VENV38)/bin/pip install -q -e '.[cpu]' "numpy<2" pytest pytest-timeout hypothesis polygraphy
	tools/install_dds.sh $(VENV38)
	$(VENV38)/bin/python -m pytest -q -p no:cacheprovider
endif

# regenerate exported/reference/ from tools/reference_model.py (fixed seed)
reference: $(VENV)/.dev
	$(BIN)/python -m runtime.cli export --factory tools.make_reference:student --out exported/reference

clean:
	rm -rf $(VENV) $(VENV38) reports .pytest_cache build/cyclonedds-home
