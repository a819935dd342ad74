# Two entry points, each creating/reusing .venv:  `make demo`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.steadylm-installed
OUT    ?= runs/demo

.PHONY: demo quick test test-slow bench gpu-check setup clean

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

bench: $(STAMP)
	$(VENV)/bin/steadylm bench ops

# On a CUDA machine: the CUDA variants of the tests, `bench ops` and `bench model`, all results (CSV +
# markdown + test log) under $(GPU_OUT). GPU_PY is a Python whose torch is a CUDA build (the .venv of
# `make setup` pins the CPU wheel), with steadylm importable, e.g. `make gpu-check GPU_PY=python3`
# after `pip install -e .[dev]`. Sized to finish in <= 10 minutes on one H100 (compiles dominate).
GPU_PY  ?= $(PY)
GPU_OUT ?= runs/gpu-check
gpu-check:
	$(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch.cuda.is_available() is False for $(GPU_PY)')"
	mkdir -p $(GPU_OUT)
	$(GPU_PY) -m pytest -q -m cuda > $(GPU_OUT)/cuda-tests.txt 2>&1; echo $$? > $(GPU_OUT)/cuda-tests.status; \
		tail -n 30 $(GPU_OUT)/cuda-tests.txt
	$(GPU_PY) -m steadylm.cli bench ops --device cuda --dtypes bf16,fp32 --repeats 10 \
		--csv $(GPU_OUT)/bench-ops.csv --markdown $(GPU_OUT)/bench-ops.md
	$(GPU_PY) -m steadylm.cli bench model --device cuda --presets micro --activations swiglu,powlu \
		--norms rmsnorm,bhyt --csv $(GPU_OUT)/bench-model.csv --markdown $(GPU_OUT)/bench-model.md
	$(GPU_PY) -m steadylm.cli bench model --device cuda --presets nano-moe --activations swiglu \
		--norms rmsnorm --no-hf --csv $(GPU_OUT)/bench-model.csv --markdown $(GPU_OUT)/bench-model-moe.md
	# What a decode-sized call costs on CUDA through Dynamo, then with direct builds opted in (decides DIRECT_DEVICES).
	$(GPU_PY) -m steadylm.bench.call_overhead --device cuda --rows 1 8 | tee $(GPU_OUT)/call-overhead-cuda.md
	STEADYLM_DIRECT_DEVICES=cpu,cuda $(GPU_PY) -m steadylm.bench.call_overhead --device cuda --rows 1 8 \
		| tee $(GPU_OUT)/call-overhead-cuda-direct.md
	@echo "gpu-check: results in $(GPU_OUT)"
	@test "$$(cat $(GPU_OUT)/cuda-tests.status)" = 0 || { echo "gpu-check: CUDA tests FAILED (see $(GPU_OUT)/cuda-tests.txt)"; exit 1; }

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
