# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv,
# installs torch==2.13.0 first (the local CPU build here; an unpinned torch pulls CUDA wheels),
# then this project with its extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-thorough fuzz bench bench-int8 bench-all bench-fuse bench-scale corpus-table layout-targets clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq torch==2.13.0
	$(PY) -m pip install -qq -e ".[test,onnx,coreml,executorch,bench]" torch==2.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest tests

test-thorough: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest tests

# seeded differential fuzzing of fuse / fuse_onnx_model, every capture, 30 minutes at most
# (tests/fuzzing.py; a short run is part of make test: tests/test_fuzz.py)
fuzz: $(STAMP)
	$(PY) tools/fuzz.py --seeds 0:2000 --time-budget 1800

# the zoo before/after fusion: latency (eager, ONNX Runtime), MACs, ONNX nodes, MIL ops
bench: $(STAMP)
	$(PY) tools/bench.py

# the int8 section alone: SQNR and XNNPACK / ONNX Runtime int8 latency per fusion form, and
# the SQNR-latency plot (out/bench/bench-int8.md, .json, .png)
bench-int8: $(STAMP)
	$(PY) tools/bench.py --int8-only

bench-all: $(STAMP)
	$(PY) tools/bench.py --all

# the engine against hand-written reparameterize() on the reference models; fuse() scaling
bench-fuse: $(STAMP)
	$(PY) tools/bench_fuse.py

# time and peak memory of fuse() and the ONNX command line on the largest models (RepVGG-B3,
# a RepVGG chain over 2 GB with external data) against hand-written code and onnx.load+save
bench-scale: $(STAMP)
	$(PY) tools/bench_scale.py

# the third-party corpus: fuse() against each library's own re-parameterization
corpus-table: $(STAMP)
	$(PY) tools/corpus_table.py

# folds across reshapes on LeViT-128S and a NextViT-S-sized model: torch and ONNX
layout-targets: $(STAMP)
	$(PY) tools/layout_targets.py

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
