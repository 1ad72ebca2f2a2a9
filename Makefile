# fedface quick start: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use: torch 2.13.0 (CPU) first, then fedface and its deps.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedface-installed

.PHONY: demo test install lint bench-scale superlink clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedface demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check fedface server client crypto experiments tests

bench-scale: $(STAMP)
	$(BIN)/fedface bench scale --json experiments/results/bench_scale.json

# A local SuperLink for `flwr run .` that uses this .venv instead of building a fresh
# environment per run (Flower's default `uv sync` would download a CUDA torch, GBs).
superlink: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/flower-superlink --insecure --simulation \
	  --isolation subprocess --control-api-address 127.0.0.1:39093 \
	  --host 127.0.0.1 --port 39091 --disable-runtime-dependency-installation

clean:
	rm -rf $(VENV) runs .pytest_cache
