# Quick start: `make serve` (install, build the default model once, serve on 127.0.0.1:50051)
#              `make test`  (install, build the default model once, run the tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   ?= requirements/lock.txt
GPU_LOCK := requirements/gpu.txt
GPU_RUNTIME_LOCK := requirements/gpu-runtime.txt
LOCK_VENV := .cache/lock-venv
PIP_TOOLS := pip-tools==7.7.0
MODEL  ?= multilingual-e5-small
ARGS   ?=
USERS  ?= 16
SPAWN_RATE ?= 4
DURATION ?= 60s
FUZZ_REQUESTS ?= 10000


.PHONY: lock install lint model serve serve-ray test test-fast bench bench-peers bench-ray loadtest fuzz overload chaos eval-skills finetune proto clean-models

# Installs exactly what requirements/lock.txt pins (hashes checked, nothing resolved), then the
# project itself without its dependencies. `make lock` is the only way the pins change.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

# Lint and format (ruff), types (mypy) and the layering contracts (import-linter, pyproject.toml).
# mypy and import-linter read the package as it ships: a staging copy laid out like the wheel
# (`openemploi/` with `kernels/` and `v1/` inside), since the editable install maps three folders.
LINT_PATHS := server kernels proto/generate.py benchmarks tests
LINT_TREE  := .cache/lint-tree
lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	rm -rf $(LINT_TREE) && $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --no-index --target $(LINT_TREE) . && rm -rf build
	PYTHONPATH=$(LINT_TREE) $(BIN)/lint-imports --no-cache
	MYPYPATH=$(LINT_TREE) $(BIN)/mypy --cache-dir .cache/mypy -p openemploi

model: install
	$(BIN)/openemploi models build $(MODEL)

# Fine-tune MODEL on the ROME catalogue into models/$(FINETUNED)/ and build it (README "Fine-tuning"),
# then evaluate both on the dev set's tuning and held-out parts, fitting each model's fusion on `tune`.
FINETUNED ?= e5-small-rome
finetune: model
	$(BIN)/openemploi models finetune $(MODEL) --name $(FINETUNED) --force $(ARGS)
	$(BIN)/python benchmarks/eval_rome.py --models $(MODEL),$(FINETUNED) --fit-fusion --promote $(FINETUNED)

# var/promoted.toml: written by `make finetune` when the fine-tuned model wins on the held-out part.
PROMOTED := $(wildcard var/promoted.toml)
serve: model
	$(BIN)/openemploi serve $(if $(PROMOTED),--config $(PROMOTED)) $(ARGS)

# The same services through Ray Serve: a local single-node Ray unless ARGS has --ray-address.
serve-ray: model
	$(BIN)/openemploi serve --ray $(if $(PROMOTED),--config $(PROMOTED)) $(ARGS)

# `python -P`: the repo root stays off sys.path, so its top-level folders (kernels/, server/) never
# shadow an installed distribution of the same name; tests import only the installed `openemploi`.
test: model lint
	$(BIN)/python -P -m pytest -q

# The unit tier (no server, no model build): the inner loop, under 90 s on 2 cores.
test-fast: install
	$(BIN)/python -P -m pytest -q -m "not integration and not slow"

# Full benchmark suite (< 5 min on 2 cores): JSON + markdown + PNG under benchmarks/results/.
bench: model
	$(BIN)/python benchmarks/suite.py $(ARGS)

# Infinity (pinned, torch from the local CPU wheel) into .cache/peers/infinity, never the project's
# venv; then the peers part alone. `make bench` includes the peers part whenever that venv exists.
bench-peers: model
	$(BIN)/python benchmarks/peers.py --install
	$(BIN)/python benchmarks/suite.py --parts peers $(ARGS)

# 1 vs 2 Embedder replicas on Ray Serve (a head and two worker nodes started here) against the
# single-process server, same clients, one run (~5 min): benchmarks/results/ray-scale-<date>-vm.{json,md}.
bench-ray: model
	$(BIN)/python -P benchmarks/ray_scale.py $(ARGS)

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

# Skills and transitions on the team's dev sets (both splits), with baselines; the first run indexes (minutes).
eval-skills: model
	$(BIN)/python -P benchmarks/eval_skills.py $(ARGS)

proto: install
	$(BIN)/python proto/generate.py

clean-models:
	rm -rf models/*/*/ models/.cache

# Re-pin after editing the dependencies in pyproject.toml (keeps every other pin), or
# `make lock UPGRADE=1` to move every pin to its newest release. Commit the lock files.
# GPU_RUNTIME_LOCK is the Docker image's runtime stage: the `gpu` extra alone, no build tools,
# seeded with the GPU lock's pins so that both stages of the image agree.
COMPILE = $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade)
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install --quiet '$(PIP_TOOLS)')
	$(COMPILE) --extra cpu --extra build --extra dev --extra ray -o $(LOCK) pyproject.toml
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(COMPILE) --extra gpu --extra build --extra ray -o $(GPU_LOCK) pyproject.toml
	test -f $(GPU_RUNTIME_LOCK) || cp $(GPU_LOCK) $(GPU_RUNTIME_LOCK)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(COMPILE) --extra gpu --extra ray -o $(GPU_RUNTIME_LOCK) pyproject.toml
