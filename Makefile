# The two commands of the README: `make demo` and `make test`. `make test-gpu` runs the CUDA cases (tests/gpu)
# on a GPU machine; it needs a CUDA build of torch (e.g. `make test-gpu TORCH_PIN=torch==X` with the index
# that serves it). Each installs what it needs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build available on these machines so nothing pulls a CUDA build.
TORCH_PIN := torch==2.13.0

# the lowest transformers the declared range allows (pyproject.toml); the newest is what `make test` installs
TRANSFORMERS_LOWEST := transformers==5.18.0
LOWEST := .venv-lowest

.PHONY: install install-lmms install-plugin demo test test-gpu test-lowest lint clean gpu-bundle

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test]" $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

# The lmms-eval extra (its tests run the real lmms-eval CLI). lmms-eval pulls torchvision, whose only build
# here is for a CUDA torch: it fails at import and breaks transformers' model classes, so it is removed.
$(VENV)/.installed-lmms: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test,lmms-eval]" $(TORCH_PIN)
	$(BIN)/pip uninstall -y -q torchvision || true
	touch $@

install-lmms: $(VENV)/.installed-lmms

# The example plug-in package (a pruner found through the entry-point group explainprune.pruners): the tests
# run it in get_pruner, eval, flops and lmms-eval as an outside package (docs/plugins.md).
PLUGIN_EXAMPLE := examples/explainprune-plugin-example
$(VENV)/.installed-plugin: $(VENV)/.installed $(PLUGIN_EXAMPLE)/pyproject.toml
	$(BIN)/pip install -q --no-deps -e $(PLUGIN_EXAMPLE)
	touch $@

install-plugin: $(VENV)/.installed-plugin

demo: install
	$(BIN)/explainprune demo

test: install-lmms install-plugin gpu-bundle
	$(BIN)/ruff check src tests benchmarks recipes
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-gpu: install
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: error: no CUDA device visible to torch ' + torch.__version__ + ' (a CUDA build of torch and a GPU are needed)')"
	$(BIN)/python -m pytest -q -m gpu tests/gpu

test-lowest:
	test -x $(LOWEST)/bin/python || $(PY) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q $(TORCH_PIN)
	$(LOWEST)/bin/pip install -q -e ".[test]" $(TORCH_PIN) $(TRANSFORMERS_LOWEST)
	$(LOWEST)/bin/python -m pytest -q

# The wheels the GPU machine lacks or has too old (docs/devices.md "The GPU check"): it has Python 3.12, torch
# 2.11+cu130, transformers 5.17 (below our range) and no package index. Only transformers is needed: its other
# requirements (huggingface-hub 1.33, tokenizers 0.23, safetensors 0.8, typer, ...) are there, regex is carried
# since transformers checks its version (>=2025.10.22) at import and the machine's is not known; the GPU
# tests decode no video file (no PyAV). benchmarks/gpu_check.sh installs the folder with --no-index --no-deps.
GPU_BUNDLE := .gpu-bundle
GPU_WHEELS := transformers==5.24.0 regex==2026.12.2
GPU_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
$(GPU_BUNDLE)/.done: Makefile | $(BIN)/python
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)
	$(BIN)/pip download -q --no-deps --only-binary=:all: $(GPU_PLATFORMS) -d $(GPU_BUNDLE) $(GPU_WHEELS)
	touch $@

gpu-bundle: $(GPU_BUNDLE)/.done
	@du -cb $(GPU_BUNDLE)/*.whl | awk '{printf "%s %.1f MiB\n", $$2, $$1 / 1048576}'
	@echo "plus the working tree: $$(git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "%.1f MiB", $$1 / 1048576}')" \
		"(the device tool carries 64 MiB in all; carry: [\"$(GPU_BUNDLE)\"])"

lint: install
	$(BIN)/ruff check src tests benchmarks recipes

clean:
	rm -rf $(VENV) $(LOWEST) $(GPU_BUNDLE) build *.egg-info src/*.egg-info
