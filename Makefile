# Quick start: `make serve` (install, build the default model once, serve on 127.0.0.1:50051)
#              `make test`  (install, build the default model once, run the tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= multilingual-e5-small
ARGS   ?=
USERS  ?= 16
SPAWN_RATE ?= 4
DURATION ?= 60s
FUZZ_REQUESTS ?= 10000

.PHONY: install model serve test bench loadtest fuzz overload chaos proto clean-models

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

# Full benchmark suite (< 5 min on 2 cores): JSON + markdown + PNG under benchmarks/results/.
bench: model
	$(BIN)/python benchmarks/suite.py $(ARGS)

# Headless locust run against a server it starts itself: CSV + HTML under benchmarks/results/loadtest/.
loadtest: model
	$(BIN)/python benchmarks/loadtest.py --users $(USERS) --spawn-rate $(SPAWN_RATE) --run-time $(DURATION) $(ARGS)

# Property-based fuzzing of a live server (>= FUZZ_REQUESTS requests); prints how each was answered.
fuzz: model
	$(BIN)/python benchmarks/fuzz.py --requests $(FUZZ_REQUESTS) $(ARGS)

# Overload: 4x measured capacity; admitted p99, refusal latency, memory.
overload: model
	$(BIN)/python benchmarks/overload.py $(ARGS)

chaos: model
	$(BIN)/python benchmarks/chaos.py $(ARGS)

proto: install
	$(BIN)/python proto/generate.py

clean-models:
	rm -rf models/*/*/ models/.cache
