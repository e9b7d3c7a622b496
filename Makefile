# maptools developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.maptools-installed
export MPLBACKEND := Agg

.PHONY: setup test demo docs lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

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
