# Two entry points for users: `make demo` and `make test`. Both create .venv if it is missing and
# install evoray into it. torch is installed first, pinned, so that no other package pulls a
# different (e.g. multi-GB CUDA) build; override with `make test TORCH_SPEC='torch==2.13.0'`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[dev,lm-eval,peer]'
	touch $(STAMP)

# The default job: Evolver (individual and with average/Fisher/RegMean mergers) on the embedded
# zoo, built on first use; prints experts, one-shot merges and Evolver variants side by side.
demo: $(STAMP)
	$(BIN)/evoray run search_spaces/evolver.yaml -q

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# Local work: everything but what starts Ray, Tune or a cluster (markers in tests/conftest.py).
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
