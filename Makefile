# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel of torch these machines carry (pip's find-links here: 2.13.0+cpu); a bare
# `torch` would pull a multi-GB CUDA build. Elsewhere, add the CPU index to get the same:
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH  := torch==2.13.0

.PHONY: install run tune test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[server,worker,dev]'
	touch $(STAMP)

install: $(STAMP)

examples/data/digits_train.npz: examples/make_digits.py | $(STAMP)
	$(BIN)/python examples/make_digits.py examples/data

# The main job: the API on the embedded SQLite default (./ssad.db) with one embedded
# worker. Open the printed /docs URL, or run examples/tune.sh against it.
run: $(STAMP)
	$(BIN)/python -m service

# The engine alone on the bundled digits example (no server, no database).
tune: examples/data/digits_train.npz
	$(BIN)/python -m worker.tune --train examples/data/digits_train.npz \
		--test examples/data/digits_test.npz --n-trials 12 \
		--scores-out examples/data/scores.csv

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=25

# The developers' fast lane: no Postgres, no server or worker processes, no real training
# or fuzzing (markers set in tests/conftest.py), on both cores (pytest-xdist); bytecode
# caching on so that pytest's rewritten test and plugin modules are not rebuilt each run.
# `make test` runs everything.
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q -p no:cacheprovider -n 2 \
		-m "not postgres and not server and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench.engine --out bench/results/engine.json
	$(BIN)/python -m bench.cost --out bench/results/cost.json
	$(BIN)/python -m bench.service --out bench/results/service.json
	$(BIN)/python -m bench.faults --out bench/results/faults.json

clean:
	rm -rf $(VENV) examples/data .mypy_cache .ruff_cache .ssad-cache ssad.db ssad-optuna.db
