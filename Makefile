# The two commands: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench fixture-realistic frontend-image nix-image

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	MYPY=$(VENV)/bin/mypy bash scripts/typecheck-tests.sh
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	MYPY=$(VENV)/bin/mypy bash scripts/typecheck-tests.sh

bench: setup
	$(PY) bench/compose_bench.py
	$(PY) bench/layer_reuse.py

# The BuildKit frontend image (Debian minbase + our frontend), loaded into $DOCKER_HOST.
frontend-image:
	@bash scripts/frontend-image.sh

# The Nix image `docker build -f app.nix` evaluates in (Debian minbase + nix-bin).
nix-image:
	@bash scripts/nix-image.sh
