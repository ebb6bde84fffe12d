# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
TORCH   := torch==2.13.0
STAMP_RT   := $(VENV)/.installed-runtime
STAMP_TEST := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: demo test venv clean bench bench-quick fuzz

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP_RT): pyproject.toml | $(VENV)/bin/python
	$(VPY) -m pip install -q -e .
	touch $@

# torch is pinned in the same pip command as everything that depends on it.
$(STAMP_TEST): pyproject.toml | $(VENV)/bin/python
	$(VPY) -m pip install -q -e ".[test]" $(TORCH)
	touch $@ $(STAMP_RT)

venv: $(STAMP_RT)

demo: $(STAMP_RT)
	$(VPY) -m dconnx.demo --out demo-out

# Two pytest-xdist workers (each test file on one worker, so that its module fixtures are built
# once); PYTEST_WORKERS=0 runs in one process. Prints the session's wall time and each worker's
# peak RSS, and fails when one exceeds 6 GB (DCONNX_TEST_RSS_LIMIT_GB=<GB> overrides;
# tests/conftest.py, tests/peak_rss.py), and the 25 slowest tests.
PYTEST_WORKERS ?= 2
test: $(STAMP_TEST)
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# The full explanation-quality benchmark of docs/results.md (dconnx eval on the trained
# fixture; about 20 minutes on 2 CPU cores). Plots need the `eval` extra (matplotlib, scikit-image).
STAMP_EVAL := $(VENV)/.installed-eval
EVAL_OUT   ?= eval-out
EVAL_ARGS  ?= --data synthetic --n 256 --layers 0,3,6,8,11 --alphas 0,0.2,0.3,0.35,0.4,0.45,0.5 \
              --max-sens-samples 50 --max-sens-n 32 --sanity-n 32 --sanity-layers 0,11 --csc-vectors 5

$(STAMP_EVAL): pyproject.toml | $(VENV)/bin/python
	$(VPY) -m pip install -q -e ".[eval]"
	touch $@

.PHONY: eval-full
eval-full: $(STAMP_EVAL)
	$(VPY) -m dconnx eval models/fixture_cnn.onnx $(EVAL_ARGS) -o $(EVAL_OUT)

# Attributions side by side against the peers (benchmarks/run.py, results in benchmarks/out/;
# benchmarks/RESULTS.md is the report written from a full run). DCONNX_AUTHORS_REF=<checkout of
# the authors' dc_decompose> adds their code. BENCH_ARGS passes options (--models, --batches, ...).
BENCH_ARGS ?=
bench: $(STAMP_TEST)
	$(VPY) benchmarks/run.py --threads 2 $(BENCH_ARGS)
	$(VPY) benchmarks/memory.py --threads 2
	$(VPY) benchmarks/serve_load.py

# The CI smoke run: fixture model, batch 2, one round; checks nothing about speed.
bench-quick: $(STAMP_TEST)
	$(VPY) benchmarks/run.py --quick $(BENCH_ARGS)

# Property-based fuzzing (docs/reliability.md): random ReLU CNNs through the compiler and
# random corruptions of a model file, FUZZ_EXAMPLES of each (CI runs 200 and 150, fixed).
# FUZZ_SEED picks the examples; results are reproducible for one seed.
FUZZ_EXAMPLES ?= 1000
FUZZ_SEED     ?= 0
fuzz: $(STAMP_TEST)
	DCONNX_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VPY) -m pytest -q -p no:cacheprovider \
	    tests/test_fuzz.py tests/test_hostile.py -k "random_relu_cnns or corrupted_bytes" \
	    --hypothesis-seed=$(FUZZ_SEED) --hypothesis-show-statistics
