# Two commands set up a fresh machine and run pyinf:
#   make demo   # creates .venv, installs pyinf and torch, runs the built-in demo
#   make test   # same set-up with the dev extras, then the test suite
# Override PYTHON to pick another interpreter (3.10+).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# torch is installed first, pinned, so that later installs (kronfluence's dependencies) do
# not move it (a .venv that already has a torch, made by an earlier run, skips this step).
# .venv does not see the interpreter's own packages: on a GPU image whose torch should stay,
# install with pip directly (README, "Two commands"). torch comes from pip's
# configured index: plain PyPI serves the multi-GB CUDA build, so on a CPU machine pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (this project's CI machines provide a CPU
# wheel locally).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test install install-dev bench-smoke wheelhouse clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel "pybind11>=2.12" cmake ninja
	# headers only (CUTLASS/CuTe for the Hopper kernel); --no-deps: it needs nothing at build time
	$(PIP) install -q --no-deps "nvidia-cutlass==4.2.0.0"
	touch $@

# The native backend is rebuilt when its sources change.
NATIVE_SRC := $(shell find csrc cmake -type f 2>/dev/null)

$(VENV)/.installed: $(VENV)/.base pyproject.toml setup.py CMakeLists.txt $(NATIVE_SRC)
	$(PIP) install -q --no-build-isolation -e ".[hf]" "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.base pyproject.toml setup.py CMakeLists.txt $(NATIVE_SRC)
	$(PIP) install -q --no-build-isolation -e ".[dev]" "$(TORCH_SPEC)"
	# kronfluence declares torchvision, but PyPI's torchvision does not load beside the CPU
	# torch wheel and then breaks `import transformers`; kronfluence never imports it.
	$(PIP) uninstall -q -y torchvision
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/pyinf demo

# The suite runs in PYTEST_WORKERS processes, whole test files per process (module-scoped
# fixtures such as the emulated CUDA build are made once): 6 min instead of 9 on 2 cores.
PYTEST_WORKERS ?= 2

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

bench-smoke: $(VENV)/.installed-dev
	$(PY) -m benchmarks.run --smoke

# What the GPU machine (no registry access) needs beyond its image: kronfluence and its one
# dependency the image lacks (einconv), CUTLASS's headers, and the commit being measured
# (the machine gets the working tree without .git). Carry .wheelhouse to that machine.
wheelhouse:
	mkdir -p .wheelhouse
	python3 -m pip download -q --no-deps -d .wheelhouse kronfluence==1.0.1 einconv==0.1.0 nvidia-cutlass==4.2.0.0
	git rev-parse --short HEAD > .wheelhouse/REV
	git diff --quiet HEAD || sed -i 's/$$/+dirty/' .wheelhouse/REV

clean:
	rm -rf $(VENV) build *.egg-info
