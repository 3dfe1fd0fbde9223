#!/usr/bin/env bash
# make scale-check: the Dagster definitions of this project on a real distributed executor, on one machine.
#
#   redis-server on 127.0.0.1:<free port>      the Celery broker and result backend (installed with apt if missing)
#   2 x `dagster-celery worker` (w1@host, w2@host), one task at a time each, started in a clean clone of HEAD
#   `data_only` (one category) then, while it runs, `evaluate` (one model), launched with DAGSTER_EXECUTOR=celery
#   and configs/dagster/run_celery.yaml (broker/backend swapped) against a temp DAGSTER_HOME holding
#   configs/dagster/dagster.yaml (pool `dvc`: one slot)
#   then `dvc push` to a local remote, a second clone that `dvc pull`s and passes `python -m dagster_project audit`
#
# Prints per step the worker and pid, submit/start/end, whether two DVC steps overlapped, which step waited for the
# pool, and the wall time. Everything it starts is stopped on exit (trap), whatever happens. bench/scale_check.py has
# the details and the workload overlay. Env: VENV (default .venv), KEEP=1 keeps the work dir, SCALE_CHECK_DIR=<dir>.
set -euo pipefail
set -m  # background jobs in their own process groups: a Ctrl-C reaches the foreground step, the trap stops the rest

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${VENV:-$SRC/.venv}" && pwd)"  # absolute: the workers start from the clone's directory
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH" DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
START=$(date +%s.%N)
elapsed() { "$PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$START"; }

# --- what this script needs, installed by itself
if ! command -v redis-server >/dev/null; then
  echo "== installing redis-server (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if ! "$PY" -c "import dagster_celery, redis" 2>/dev/null; then
  echo "== installing the scale extra into $VENV"
  "$PY" -m pip install -q -e "$SRC[scale]"
fi

WORK="${SCALE_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/scale-check.XXXXXX")}"
mkdir -p "$WORK/logs"
NODE="$WORK/node1" CLONE="$WORK/node2" REMOTE="$WORK/dvc-remote" CFG="$WORK/run_celery_local.yaml"
export DAGSTER_HOME="$WORK/dagster_home"
mkdir -p "$DAGSTER_HOME" && cp "$SRC/configs/dagster/dagster.yaml" "$DAGSTER_HOME/"
# Create the instance's sqlite tables once, before two workers start at the same moment and race to create them
# ("table runs already exists"). With a Postgres instance (several machines) this happens at deployment.
"$PY" -c 'import dagster; dagster.DagsterInstance.get().dispose()'

PIDS=()
STEP=""
OK=0
# The Python steps run in the background and are waited for, so that a TERM reaches the trap at once (bash runs a
# trap only after a foreground command returns) and the trap can stop the step too.
py_step() { "$PY" "$SRC/bench/scale_check.py" "$@" & STEP=$!; wait "$STEP"; STEP=""; }
tree() {  # the given pids and all their descendants, from parent links (DVC runs in its own session, so a
          # process group kill alone would leave an in-flight `dvc repro` and its stage behind)
  local all todo=("$@") out=() p c
  all=$(ps -e -o pid=,ppid=)
  while [ ${#todo[@]} -gt 0 ]; do
    p=${todo[0]}; todo=("${todo[@]:1}"); out+=("$p")
    for c in $(awk -v p="$p" '$2 == p {print $1}' <<<"$all"); do todo+=("$c"); done
  done
  echo "${out[@]}"
}
cleanup() {
  set +m  # no "Terminated" job notices for the processes stopped below
  local started=(${STEP:+$STEP} "${PIDS[@]}") victims pid
  if [ ${#started[@]} -gt 0 ]; then
    # only what this script started (the step, the workers, the broker) and their children, by pid
    victims=$(tree "${started[@]}")
    kill -TERM $victims 2>/dev/null || true
    for pid in $victims; do
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    done
    kill -KILL $victims 2>/dev/null || true
  fi
  if [ "$OK" = 1 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else echo "work dir kept: $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== clean clone of $(git -C "$SRC" rev-parse --short HEAD) into $NODE"
git clone -q "$SRC" "$NODE"

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BROKER="redis://127.0.0.1:$PORT/0"
py_step prepare --node "$NODE" --remote "$REMOTE" --broker "$BROKER" \
  --backend "redis://127.0.0.1:$PORT/1" --out-config "$CFG"

echo "== redis-server on 127.0.0.1:$PORT"
redis-server --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no --dir "$WORK" \
  >"$WORK/logs/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do redis-cli -p "$PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.2; done
redis-cli -p "$PORT" ping | grep -q PONG || { echo "redis-server did not start"; exit 1; }

echo "== 2 dagster-celery workers"
for w in w1 w2; do
  # a worker "machine": the clone's code (PYTHONPATH) and DVC workspace (DVC_PROJECT_DIR), the same instance and
  # DAGSTER_EXECUTOR=celery (the job it rebuilds must accept the celery run config). --concurrency=1: one step at a
  # time per worker, like one pod per step.
  (cd "$NODE" && exec env PYTHONPATH="$NODE" DVC_PROJECT_DIR="$NODE" DAGSTER_EXECUTOR=celery \
     dagster-celery worker start -n "$w" -y "$CFG" -A dagster_celery.app -- --concurrency=1) \
    >"$WORK/logs/worker_$w.log" 2>&1 &
  PIDS+=($!)
done
py_step wait-workers --config "$CFG" --count 2 --timeout 180

echo "== runs (Celery executor)"
py_step run --node "$NODE" --config "$CFG" --logs "$WORK/logs" \
  --summary "$WORK/summary.json" ${SCALE_CHECK_NO_EVAL:+--no-eval}

echo "== artifacts to a second machine: dvc push, fresh clone, dvc pull, audit"
py_step second-machine --node "$NODE" --clone "$CLONE" --remote "$REMOTE" \
  --dagster-home "$DAGSTER_HOME"

OK=1
echo "scale-check passed in $(elapsed) s (install, clone, broker, workers, runs, push/pull/audit)"
