# Two entry points: `make demo` (set up, compile the bundled model for the CPU, generate) and
# `make test` (set up, run the test suite). Both work on a fresh machine with Python >= 3.11.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
DEMO_ARTIFACT := build/kiln-demo-cpu
PROMPT ?= def read_config(path):

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	@# The pinned CPU build first: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

$(DEMO_ARTIFACT)/manifest.json: $(STAMP) models/kiln-demo/model.safetensors
	$(BIN)/kiln compile models/kiln-demo -o $(DEMO_ARTIFACT)

demo: $(DEMO_ARTIFACT)/manifest.json
	$(BIN)/kiln generate $(DEMO_ARTIFACT) --prompt "$(PROMPT)" --max-tokens 96 --temperature 0.7 --top-p 0.95 --seed 1

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

clean:
	rm -rf build
