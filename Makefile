# Quick start: `make serve` (install, build the default model once, serve on 127.0.0.1:50051)
#              `make test`  (install, build the default model once, run the tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= multilingual-e5-small
ARGS   ?=

.PHONY: install model serve test bench proto clean-models

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[build,dev]'
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/openemploi models build $(MODEL)

serve: model
	$(BIN)/openemploi serve $(ARGS)

test: model
	$(BIN)/python -m pytest -q

bench: model
	$(BIN)/python benchmarks/embed_bench.py

proto: install
	$(BIN)/python proto/generate.py

clean-models:
	rm -rf models/*/*/ models/.cache
