# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install torch + deps, build the extension, run the main job
#   make test   the same set-up, then the test suite
# Inside an existing environment with torch: pip install --no-build-isolation -e .

PY         ?= python3
VENV       ?= .venv
PYTHON     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup build demo test bench emulate-cuda clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

# The editable install (the README's `pip install --no-build-isolation -e .`) compiles
# csrc/ into disseg_kernels/_C*.so and installs the `disseg` command. When a source changes
# afterwards, build_ext --inplace recompiles only what changed (ninja, build/ kept).
# flock serialises concurrent builds of the same tree.
$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*)
	if [ -f $(VENV)/.installed ]; then \
	  flock .build.lock $(PYTHON) setup.py -q build_ext --inplace; \
	else \
	  flock .build.lock $(PYTHON) -m pip install -q --no-build-isolation -e . && touch $(VENV)/.installed; \
	fi
	touch $@

setup: $(VENV)/.built

build: $(VENV)/.built

demo: $(VENV)/.built
	$(VENV)/bin/disseg demo

test: $(VENV)/.built
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

# BENCH_ARGS: e.g. BENCH_ARGS="--quick --out-dir /tmp/bench" (default: the issue's shapes into benchmarks/results)
bench: $(VENV)/.built
	$(PYTHON) -m benchmarks.bench_dispersive $(BENCH_ARGS)

# csrc/*.cu run on the CPU through the SIMT emulator against the C++ kernels (no GPU;
# ~10 minutes on 2 cores; tests/cuda_emulation/README.md). Run it after touching a .cu file.
emulate-cuda: $(VENV)/.built
	set -e; for f in tests/cuda_emulation/check_*.py; do echo "== $$f"; $(PYTHON) $$f; done

clean:
	rm -rf build disseg_kernels/_C*.so $(VENV)/.built $(VENV)/.installed
