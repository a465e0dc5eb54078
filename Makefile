# weightless — set-up, tests, demo and benchmarks. Everything installs itself into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WL := $(VENV)/bin/weightless
STAMP := $(VENV)/.installed
DEMO := build/demo

.PHONY: venv test test-all lint demo bench data results clean
.DELETE_ON_ERROR:
# Keep every stage's output of a chain (make would delete intermediates).
.SECONDARY:

# torch is pinned in pyproject's `train` extra (torch==2.13.0): an unpinned torch pulls GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,train]'
	touch $@

venv: $(STAMP)

data: $(STAMP)
	$(WL) data fetch mnist

test: data
	$(PY) -m pytest -q -m "not slow" -n 2

test-all: data
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check weightless_cli tests bench scripts

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) bench/bench_bloomier.py
	$(PY) bench/bench_kmeans.py
	$(PY) bench/bench_sparse.py

# Reproduce docs/RESULTS.md and results/*.wl (tens of minutes on 2 cores; not part of `make test`).
results: data
	$(PY) scripts/make_results.py

# --- stages chained by file name --------------------------------------------------
# make build/demo/lenet-300-100.quant.onnx runs prune then quantize on the sample model.
PRUNE_FLAGS ?= --sparsity 0.92 --sparsity 'fc3*=0.74'
QUANT_FLAGS ?= --bits 5
ENCODE_FLAGS ?= --fp-bits 8

# An explicit rule: a pattern rule here would win make's shortest-stem match for
# $(DEMO)/x.quant.onnx and build the chain inside sample_models/.
$(DEMO)/lenet-300-100.onnx: sample_models/lenet-300-100.onnx | $(STAMP)
	@mkdir -p $(@D)
	cp $< $@

%.pruned.onnx: %.onnx | $(STAMP)
	$(WL) prune $< -o $@ -f $(PRUNE_FLAGS)

%.quant.onnx: %.pruned.onnx | $(STAMP)
	$(WL) quantize $< -o $@ -f $(QUANT_FLAGS)

%.wl: %.quant.onnx | $(STAMP)
	$(WL) encode $< -o $@ -f $(ENCODE_FLAGS)

%.decoded.onnx: %.wl | $(STAMP)
	$(WL) decode $< -o $@ -f

# The stages one by one on LeNet-300-100, then the whole Weightless loop with retraining.
demo: data
	@mkdir -p $(DEMO)
	$(WL) inspect sample_models/lenet-300-100.onnx
	$(MAKE) --no-print-directory $(DEMO)/lenet-300-100.wl
	$(WL) eval sample_models/lenet-300-100.onnx --data mnist
	$(WL) eval $(DEMO)/lenet-300-100.pruned.onnx --data mnist --reference sample_models/lenet-300-100.onnx
	$(WL) eval $(DEMO)/lenet-300-100.quant.onnx --data mnist --reference sample_models/lenet-300-100.onnx
	$(WL) verify $(DEMO)/lenet-300-100.wl --reference $(DEMO)/lenet-300-100.quant.onnx
	$(WL) decode-and-eval $(DEMO)/lenet-300-100.wl --data mnist --reference sample_models/lenet-300-100.onnx
	$(WL) compress sample_models/lenet-300-100.onnx --data mnist --recipe recipes/lenet-300-100.toml \
	    -o $(DEMO)/lenet-300-100.compressed.wl -f
	$(WL) decode-and-eval $(DEMO)/lenet-300-100.compressed.wl --data mnist \
	    --reference sample_models/lenet-300-100.onnx

clean:
	rm -rf build .pytest_cache .ruff_cache
