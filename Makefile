# Two entry points, each creating/reusing .venv:  `make demo`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.steadylm-installed
OUT    ?= runs/demo

.PHONY: demo quick test test-slow bench setup clean

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

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/steadylm bench ops

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
