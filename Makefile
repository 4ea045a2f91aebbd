# Quick start: `make demo` (the main job) and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, pinned, so nothing later pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Optional: torch-mlir for `kiln export` (extra `mlir`); --no-deps so it cannot replace the pinned torch.
	$(BIN)/python -m pip install -q --no-deps torch-mlir==20261001 && $(BIN)/python -m pip install -q numpy packaging \
		|| echo "WARNING: torch-mlir not installed; 'kiln export' (MLIR) is unavailable, everything else works"
	touch $(STAMP)

demo: install
	$(BIN)/python -m kiln demo

test: install lint
	$(BIN)/python -m pytest -q tests

# ruff (lint + format check) and mypy over the package (tests and bench excluded). mypy needs the repository
# under the name `kiln`, so it runs on a link in a scratch directory.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	d=$$(mktemp -d) && ln -s "$(CURDIR)" "$$d/kiln" && cd "$$d" && \
		"$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" --cache-dir "$(CURDIR)/.mypy_cache" \
		kiln --exclude 'kiln/(tests|bench|\.venv|[^/]*\.egg-info)/'; rc=$$?; rm -rf "$$d"; exit $$rc

clean:
	rm -rf $(VENV)
