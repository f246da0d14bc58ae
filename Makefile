# Two commands on a fresh machine (see README): `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: setup demo test lint bench browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch lies on these machines' disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# llama-cpp-python compiles from source the first time (about 5 minutes on 2 cores), then is cached.
	$(PY) -m pip install --quiet -e ".[local,space,dev,ray]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: both stages on the project's example data, with the embedded model (no server needed).
demo: setup
	$(VENV)/bin/mergeit run examples/mini_alpaca.jsonl --output out/demo --config examples/demo.yaml
	@echo "--- top of the card (out/demo/README.md) ---"
	@sed -n '1,40p' out/demo/README.md

# Debian's Chromium for the Space's browser test (a downloaded browser cannot be fetched here).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint: setup
	$(VENV)/bin/ruff check mergeit_hf tests bench spaces examples
	$(VENV)/bin/ruff format --check mergeit_hf tests bench spaces examples
	# No upward import, no import circle: the contracts in pyproject.toml ([tool.importlinter]).
	$(VENV)/bin/lint-imports

test: setup browser lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	cd bench && ../$(PY) stage1.py && ../$(PY) merge.py && ../$(PY) scale.py

clean:
	rm -rf out test-artifacts build dist
