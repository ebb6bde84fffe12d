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

test: $(STAMP_TEST)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
