# The two commands of the README: `make demo` (the main job) and `make test`.
# `make demo` runs the stages that exist so far: prepare and inspect the shipped samples, then plan MixDPO.
# Both create the virtual environment on first use; nothing needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/ultrafeedback/train_1k.jsonl.gz
SHARED ?= ../shared/data
OUT ?= demo

.PHONY: install demo test lint bench clean

# torch first, pinned to the CPU build on this disk, so no dependency pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/perpair prepare $(DATA) -o $(OUT)/ultrafeedback.parquet --test-fraction 0.1 --seed 0
	$(BIN)/perpair inspect $(OUT)/ultrafeedback.parquet
	$(BIN)/perpair plan $(OUT)/ultrafeedback.parquet --preset mixdpo -o $(OUT)/plan_mixdpo.parquet
	$(BIN)/perpair prepare $(SHARED)/hh_rlhf/harmless_base_test.jsonl.gz -o $(OUT)/hh_rlhf.parquet
	$(BIN)/perpair inspect $(OUT)/hh_rlhf.parquet
	$(BIN)/perpair prepare $(SHARED)/orca_dpo/validation_284.jsonl.gz -o $(OUT)/orca.parquet
	$(BIN)/perpair inspect $(OUT)/orca.parquet

lint: install
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/prepare_60k.py
	$(BIN)/python benchmarks/plan_60k.py

clean:
	rm -rf $(VENV) $(OUT)
