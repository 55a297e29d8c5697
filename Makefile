# One-command set-up + run.  `make figures` regenerates every table and figure on the toy world;
# `make test` runs the unit tests (among them tests/test_runner.py's check that notebook 00_tour's
# checked lines are identical with 1 and 2 torch threads) and the notebook regression tests.
# Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: setup figures test unit nbval bench clean-cache

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

figures: setup
	$(BIN)/python -m t2i_common.runner
	$(BIN)/python -m t2i_common.claims

unit: setup
	$(BIN)/python -m pytest tests

# nbval re-executes the notebooks; their figures go to a temporary folder (T2I_FIGURES) so the
# committed reference under figures/ is never rewritten by a test run.  Then every fresh
# results.json is compared with the committed one under figures/tolerances.yaml.
nbval: setup
	F=$$(mktemp -d) && T2I_FIGURES=$$F $(BIN)/python -m pytest -p no:cacheprovider --nbval-lax \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks && \
	    $(BIN)/python -m t2i_common.claims compare $$F

test: unit nbval

bench: setup
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean-cache:
	rm -rf cache runs data/generated
