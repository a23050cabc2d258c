# Masklet build entry points: `make demo`, `make test`, `make bench`.
# The virtual environment is built once and rebuilt only when pyproject.toml changes
# (the stamp file records the last successful install).

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
VENV_PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.masklet-installed

# Prefer the CPU wheel lying on local disk: a plain `torch` from the index is the multi-GB CUDA build.
# Pinning the wheel file also keeps the resolver from swapping it out later.
TORCH_VERSION ?= 2.13.0
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu-*.whl))
TORCH_REQUIREMENT ?= $(if $(TORCH_WHEEL),$(TORCH_WHEEL),torch==$(TORCH_VERSION))

MASKLET_TEST_VIDEOS ?= $(abspath ../shared/videos)
export MASKLET_TEST_VIDEOS

.PHONY: venv test demo bench bench-gpu clean-venv constraints

venv: $(STAMP)

# The last install is the reference implementation (sam2==1.1.0), the oracle for parity tests
# only; --no-deps keeps its pins from touching the CPU torch, and it is never a runtime dependency.
# constraints.txt holds every other package at the version the suite last passed with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PIP) install --upgrade pip
	$(VENV_PIP) install "$(TORCH_REQUIREMENT)"
	$(VENV_PIP) install -c constraints.txt -e '.[test]'
	SAM2_BUILD_CUDA=0 $(VENV_PIP) install -c constraints.txt --no-deps --no-build-isolation sam2==1.1.0 hydra-core iopath
	touch $(STAMP)

# Records what .venv holds now as the versions to build with (after `make test` passed on them).
constraints: $(STAMP)
	{ grep '^#' constraints.txt; $(VENV_PIP) freeze --exclude-editable | grep -iv '^torch @\|^masklet'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

test: $(STAMP)
	$(VENV_PY) -m pytest tests

demo: $(STAMP)
	$(VENV_PY) -m masklet.deploy.demo

# CPU benchmarks; gpu_bench.py needs a GPU (`make bench-gpu`).
bench: $(STAMP)
	@set -e; for script in bench/*_bench.py; do \
		[ -e "$$script" ] || { echo "no benchmarks in bench/"; break; }; \
		[ "$$script" = bench/gpu_bench.py ] && continue; \
		echo "== $$script"; \
		$(VENV_PY) "$$script"; \
	done

clean-venv:
	rm -rf $(VENV)

bench-gpu: $(STAMP)
	$(VENV_PY) bench/gpu_bench.py
