# The two commands: `make demo` and `make test`. Both work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.megalite-installed
SRCS   := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-fast lint bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch: leave an existing install alone; otherwise the CPU build where there is no CUDA
# (a bare `torch` would pull a multi-GB CUDA wheel onto a CPU machine).
$(STAMP): $(PY) $(SRCS)
	@$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    $(PY) -m pip install -q torch; \
	  else \
	    $(PY) -m pip install -q torch==2.13.0; \
	  fi; }
	$(PY) -m pip install -q pybind11 setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo]"
	@touch $(STAMP)

install: $(STAMP)

# The whole pipeline (docs/demo.md); finished stages are reused, FRESH=1 redoes them all,
# DEMO_SIZE=smoke runs the CI size. The demo extra (matplotlib, for the report's plots) is
# installed on first use.
demo: $(STAMP)
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q --no-build-isolation -e ".[demo]"
	FRESH=$(FRESH) DEMO_SIZE=$(DEMO_SIZE) $(PY) -m megalite.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q --timeout=900 tests

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/train_throughput.py --config examples/configs/tiny.yaml

clean:
	rm -rf build *.egg-info megalite/_C*.so runs
