# The quick start is two commands: `make demo` and `make test`. Both set up .venv first.
# torch is installed alone first, pinned to the CPU build: a bare `torch` would pull CUDA.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.corolla-installed

.PHONY: setup demo test test-all lint proto bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/platform train --adapter lora --dp-epsilon 3

test: setup
	$(BIN)/ruff check corolla tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy corolla
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ""

lint: setup
	$(BIN)/ruff check corolla tests benchmarks
	$(BIN)/ruff format --check corolla tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy corolla

proto: setup
	cd corolla/inference/wire && ../../../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. \
		--grpc_python_out=. --pyi_out=. blocks.proto
	sed -i 's/^import blocks_pb2 as blocks__pb2/from corolla.inference.wire import blocks_pb2 as blocks__pb2/' \
		corolla/inference/wire/blocks_pb2_grpc.py

bench: setup
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/wan.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
