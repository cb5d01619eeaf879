# kdcache: `make demo` and `make test` are all a new machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on disk here; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-long bench bench-quality bench-samples bench-tp lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m kdcache demo

# Test files run on PYTEST_JOBS processes (pytest-xdist; a file's tests stay in one process, so
# its module fixtures are built once). CI has two cores.
PYTEST_JOBS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_JOBS) --dist loadfile

# The long reliability variants `make test` deselects (pytest's addopts say -m "not long"), with
# the short ones, counted into RELIABILITY.md (tests/fixtures/reliability.py).
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_JOBS) --dist loadfile -m "long or reliability" \
		--reliability-report=RELIABILITY.md

bench: $(STAMP)
	$(BIN)/python -m bench.run

# The bytes-vs-quality study: 100 steps on seeds 0-2 and 1000 steps on seed 0, on two worker
# processes of one thread each (bench/quality.py; about 33 min on two cores).
bench-quality: $(STAMP)
	$(BIN)/python -m bench.quality --jobs 2

# Bytes per token of --samples 32 with and without a top-k (bench/samples.py; about 1 min).
bench-samples: $(STAMP)
	$(BIN)/python -m bench.samples

# kdcache build --tp 2 under torchrun against the one-process build (bench/tp.py).
bench-tp: $(STAMP)
	$(BIN)/python -m bench.tp

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m schemas.spec --check

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
