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

.PHONY: setup lab figures test unit nbval bench dryrun fullsize test-fullsize clean-cache

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# JupyterLab on the tour (notebooks/00_tour.ipynb).  As root JupyterLab refuses to start without
# --allow-root, so the target adds it then.  LAB_ARGS passes more options, e.g.
# `make lab LAB_ARGS="--no-browser --port 8890"` on a machine without a browser (open the printed
# URL from your own machine, through an SSH tunnel if needed).  Interactive runs write their
# outputs to runs/interactive/<notebook>/; `make figures` regenerates the committed figures/.
LAB_ARGS ?=
lab: setup
	@if [ "$$(id -u)" = 0 ]; then root=--allow-root; else root=; fi; \
	echo "make lab: starting JupyterLab on notebooks/00_tour.ipynb; open the URL below" \
	     "(http://127.0.0.1:PORT/lab/tree/notebooks/00_tour.ipynb?token=...); Ctrl-C twice stops it"; \
	exec $(BIN)/jupyter lab $$root --ServerApp.root_dir="$(CURDIR)" $(LAB_ARGS) notebooks/00_tour.ipynb

figures: setup
	$(BIN)/python -m t2i_common.runner
	$(BIN)/python -m t2i_common.claims

# The unit tests can run in TEST_WORKERS pytest-xdist workers, a whole test file to a worker
# (`make test TEST_WORKERS=2`; default 0: one process).  Each worker runs torch with
# OMP_NUM_THREADS threads (default 1; checked outputs do not depend on the thread count).  The
# notebooks always run one after another: those of one paper share exports, caches and trained
# models, which two processes would build at once.
TEST_WORKERS ?= 0
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
TEST_THREADS = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

# The full-size tests (random-weight SD / unCLIP / scorers at published sizes, written once to
# $$T2I_FULLSIZE or ~/.cache/t2i-repro/fullsize) take minutes each on 2 cores: `make test` runs one
# per paper (FULLSIZE_SUBSET: a full-size load and evaluation each; about 10 GB written the first
# time), `make test-fullsize` runs them all.
FULLSIZE_SUBSET := "tests/test_fullsize.py::test_scorers_at_full_size[clip-vit-b-32]" \
	tests/test_fullsize.py::test_sd15_attribution_gradient_at_full_size \
	tests/test_fullsize.py::test_unclip_small_with_karlo_prior_at_full_size \
	tests/test_fullsize.py::test_sd21_base_loads_and_evaluates_at_full_size
unit: setup
	$(TEST_THREADS) $(BIN)/python -m pytest $(XDIST) tests -m "not fullsize"
	$(BIN)/python -m pytest $(FULLSIZE_SUBSET)

test-fullsize: setup
	$(BIN)/python -m pytest tests -m fullsize

# nbval re-executes the notebooks; their figures go to a temporary folder (T2I_FIGURES) so the
# committed reference under figures/ is never rewritten by a test run.  Then every fresh
# results.json is compared with the committed one under figures/tolerances.yaml.
nbval: setup
	F=$$(mktemp -d) && T2I_FIGURES=$$F $(BIN)/python -m pytest -p no:cacheprovider \
	    --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks && \
	    $(BIN)/python -m t2i_common.claims compare $$F

test: unit nbval

# Full-size random-weight reference folders (~15 GB, outside the repository: $T2I_FULLSIZE or
# ~/.cache/t2i-repro/fullsize) and the dry run of every notebook's paper settings on them
# (CPU, float32, sizes cut; outputs in runs/dryrun/, labelled as a dry run).
fullsize: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m t2i_common.fullsize write all

dryrun: fullsize
	OMP_NUM_THREADS=1 $(BIN)/python -m t2i_common.dryrun

bench: setup
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean-cache:
	rm -rf cache runs data/generated
