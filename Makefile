# Two commands on a fresh machine (see README): `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3
# llama-cpp-python, built portable (see below) and kept outside the venv so a fresh clone reuses it.
LLAMA_CPP := 0.3.36
WHEELS    := $(HOME)/.cache/mergeit-hf/wheels-portable

.PHONY: setup demo test lint bench browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch lies on these machines' disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# llama-cpp-python compiles from source once (about 15 minutes on 2 cores) into a wheel kept in
	# $(WHEELS). Built without -march=native: a native wheel from pip's cache, built on another of these
	# machines, dies with "Illegal instruction" here (their CPUs differ). --no-cache-dir so pip builds
	# instead of reusing that cached wheel.
	test -n "$$(ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl 2>/dev/null)" || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip wheel --quiet --no-cache-dir --no-deps \
	    -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP)
	$(PY) -m pip install --quiet --find-links $(WHEELS) "llama-cpp-python[server]==$(LLAMA_CPP)"
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
