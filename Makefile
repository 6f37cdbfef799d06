# Two entry points for a fresh clone: `make demo` and `make test` (both install first).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export OMP_NUM_THREADS ?= 1
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-slow test-cluster bench clean gpu-check gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(BIN)/python -c "import torch, ray, deepspeed, pydicom, webdataset; assert '+cpu' in torch.__version__ or not torch.cuda.is_available()"
	# DeepSpeed JIT-compiles its CPU shared-memory all-reduce op on first use (~90 s on 2 cores): build it
	# here, once, into ~/.cache/torch_extensions, rather than inside the first training run
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
		get_accelerator().create_op_builder('ShareMemCommBuilder').load()" > /dev/null
	touch $@

demo: install
	$(BIN)/cxrray demo

test: install
	$(BIN)/python -m pytest -q --durations=25

test-slow: install
	$(BIN)/python -m pytest -q -m slow --durations=10

# a head and worker nodes started with `ray start` on this machine (tests/test_multinode.py)
test-cluster: install
	$(BIN)/python -m pytest -q -m cluster --durations=10

# The GPU check (issue 27 §6): one call, one JSON line per figure. Where this venv is absent (a bare GPU
# image with its own torch), it runs under python3 with the wheels `make gpu-wheels` put in .whl/ (the image
# must have torch, numpy, scikit-learn, torchmetrics, transformers, PyYAML). `make gpu-check ARGS="--only mfu"`.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_WHEELS := $(if $(wildcard $(BIN)/python),,$(wildcard .whl/*.whl))
GPU_SITE := /tmp/cxrray-gpu-site
gpu-check:
	$(if $(GPU_WHEELS),PIP_CONSTRAINT= $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target $(GPU_SITE) $(GPU_WHEELS) &&) \
	$(if $(GPU_WHEELS),PYTHONPATH=$(GPU_SITE)) PYTHONUNBUFFERED=1 $(GPU_PY) bench/gpu_check.py $(ARGS)

# cxrray's pure dependencies that a bare CUDA image lacks, as CPython 3.12 wheels (DeepSpeed built here)
gpu-wheels: install
	PIP_CONSTRAINT= $(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(BIN)/pip list --format=freeze | grep -iE '^(pydantic|pydantic.core|annotated.types|typing.inspection|diffusers|pydicom|hjson)==')
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"

clean:
	rm -rf $(VENV) data_shards/* mlflow.db mlruns demo_out
