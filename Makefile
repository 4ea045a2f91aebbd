# Quick start: `make demo` (the main job) and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test demo test test-gpu-stack lint clean

# What the demo (and serving) needs: the CPU build of torch first, pinned, so nothing later pulls a CUDA build;
# then kiln.
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

# What the tests add: the dev tools, the third-party clients tested against `kiln serve`, Ray Serve and matplotlib
# for `kiln profile --png` (extras dev, clients, ray, profile).
install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,clients,ray,profile]'
	# Optional: torch-mlir for `kiln export` (extra `mlir`); --no-deps so it cannot replace the pinned torch.
	$(BIN)/python -m pip install -q --no-deps torch-mlir==20261001 && $(BIN)/python -m pip install -q numpy packaging \
		|| echo "WARNING: torch-mlir not installed; 'kiln export' (MLIR) is unavailable, everything else works"
	touch $(TEST_STAMP)

demo: install
	$(BIN)/python -m kiln demo

# Two pytest workers, one test file each at a time (module fixtures are built once); the few tests that time
# a stream against the wall clock run afterwards, alone.
test: install-test lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial" tests
	$(BIN)/python -m pytest -q -m serial tests

# The GPU machine's versions (torch 2.11, transformers 5.17, triton 3.6; see README "Tested versions") in a venv
# of their own, on the CPU: capture, passes, kernels under the interpreter, the engine and server against HF. Not in
# `make test`: that torch is the 5 GB CUDA build. numpy < 2.4: Triton 3.6's interpreter makes ints of 1-element
# arrays, which numpy 2.4 refuses.
STACK := $(VENV)/gpu-stack
test-gpu-stack:
	test -x $(STACK)/bin/python || $(PY) -m venv $(STACK)
	$(STACK)/bin/python -m pip install -q torch==2.11.0 transformers==5.17.0 triton==3.6.0 'numpy<2.4' \
		-e '.[dev]' jsonschema
	$(STACK)/bin/python -m pytest -q -n 2 --dist loadfile -m "not serial" tests
	$(STACK)/bin/python -m pytest -q -m serial tests

# ruff (lint + format check) and mypy over the package (tests and bench excluded). mypy needs the repository
# under the name `kiln`, so it runs on a link in a scratch directory.
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	d=$$(mktemp -d) && ln -s "$(CURDIR)" "$$d/kiln" && cd "$$d" && \
		"$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" --cache-dir "$(CURDIR)/.mypy_cache" \
		kiln --exclude 'kiln/(tests|bench|\.venv|[^/]*\.egg-info)/'; rc=$$?; rm -rf "$$d"; exit $$rc

clean:
	rm -rf $(VENV)
