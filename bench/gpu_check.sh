#!/usr/bin/env bash
# Issue 22's GPU check in one command: install the GPU extra (+ vLLM when it fits), then bench/gpu_check.py, which
# materializes sft_checkpoint (DeepSpeed ZeRO-2, then ZeRO-3) and raw_cots (transformers, then vLLM) through Dagster
# in a temporary copy of the project and writes bench/results/gpu_check.json. Offline; embedded SmolLM2-135M only.
#
#   bash bench/gpu_check.sh                                    # online GPU machine: pip install -e .[gpu] (+ vllm)
#   bash bench/gpu_check.sh --wheelhouse DIR [--wheelhouse D2]  # offline: wheels from gpu_check.py --pack-wheels
#   bash bench/gpu_check.sh --copy-to DIR -- --steps sft_zero2 # also copy JSON + log to DIR; after --: arguments
#                                                              #   of bench/gpu_check.py (see its --help)
# Options: --python PY (default: $PYTHON or python3: the interpreter with CUDA torch), --no-install, --no-vllm,
#          --site DIR (offline installs go there, first on PYTHONPATH; default /tmp/gpu_check_site).
#
# The logic lives in gpu_check.py; this file only installs and records what it installed (name<TAB>status<TAB>detail
# lines in bench/results/gpu_check_install.tsv, copied into the JSON). A failed vLLM install is not an error: the
# vLLM steps are then skipped with the recorded reason.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELHOUSES=()
COPY_TO=""
INSTALL=1
VLLM=1
SITE=/tmp/gpu_check_site
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSES+=("$2"); shift 2 ;;
    --copy-to) COPY_TO=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --site) SITE=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --no-vllm) VLLM=0; PASS+=(--no-vllm); shift ;;
    -h|--help) sed -n '2,16p' "$0"; exec "$PY" bench/gpu_check.py --help ;;
    --) shift; PASS+=("$@"); break ;;
    *) PASS+=("$1"); shift ;;
  esac
done

RESULTS=bench/results
mkdir -p "$RESULTS" ${COPY_TO:+"$COPY_TO"}
LOG=$RESULTS/gpu_check.log
REPORT=$RESULTS/gpu_check_install.tsv
: >"$REPORT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DVC_NO_ANALYTICS=1
T0=$(date +%s)
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" | tee -a "$REPORT"; }

# DVC runs the stage commands as `python -m pipelines ...`: make sure `python` is this interpreter even where only
# python3 exists (gpu_check.py also puts its own interpreter's directory first on PATH for DVC).
SHIM=$(mktemp -d)
ln -s "$(command -v "$PY")" "$SHIM/python"
export PATH="$SHIM:$PATH"

install_offline() {
  # pip --target with --no-deps: the wheelhouse holds exactly what the machine's image lacks (device_wheels.txt),
  # and the image's own torch/transformers must stay the ones in use, so nothing is resolved or upgraded.
  local scratch f
  scratch=$(mktemp -d)
  # Files over one carried part were cut by --pack-wheels into NAME.partKofN (the parts may come in different
  # folders): gpu_check.py joins them (stdlib + yaml only, so it runs before anything is installed).
  if ! "$PY" bench/gpu_check.py --join-wheels "$scratch" "${WHEELHOUSES[@]}"; then
    record project failed "wheelhouse incomplete (see the log)"; return 1
  fi
  mkdir -p "$SITE"
  local wheels=("$scratch"/*.whl) sdists=("$scratch"/*.tar.gz)
  if [ -e "${wheels[0]}" ] &&
     ! "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}"; then
    record project failed "pip install --target $SITE of ${#wheels[@]} wheels failed"; return 1
  fi
  # deepspeed ships only an sdist; it is built here, against this machine's CUDA torch (no build isolation: an
  # isolated build env would need the index for setuptools and torch).
  for f in "${sdists[@]}"; do
    [ -e "$f" ] || continue
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SITE" "$f"; then
      record "$(basename "$f" .tar.gz)" failed "build from sdist failed"
    fi
  done
  record project ok "offline: ${#wheels[@]} wheels + sdists from ${WHEELHOUSES[*]} into $SITE (first on PYTHONPATH)"
}

install_vllm() {
  if "$PY" -c 'import vllm' 2>/dev/null; then
    record vllm ok "already installed: $("$PY" -c 'import vllm; print(vllm.__version__)')"; return
  fi
  if [ ${#WHEELHOUSES[@]} -gt 0 ]; then
    local w have="" links=()
    for w in "${WHEELHOUSES[@]}"; do
      ls "$w"/vllm-*.whl >/dev/null 2>&1 && have=$w
      links+=(--find-links "$w")
    done
    if [ -z "$have" ]; then
      record vllm unavailable "offline, and no vllm wheel in the wheelhouse (vllm with its dependencies is several hundred MB)"
    elif "$PY" -m pip install -q --no-index "${links[@]}" --target "$SITE" vllm; then
      record vllm ok "from the wheelhouse"
    else
      record vllm unavailable "pip install from the wheelhouse failed (see the log)"
    fi
    return
  fi
  # Online: only when the resolver keeps this machine's torch. vLLM pins an exact torch; letting pip swap the CUDA
  # torch under the project would make every other step measure a different stack, or break it.
  local rep torch_change
  rep=$(mktemp)
  if ! "$PY" -m pip install -q --dry-run --report "$rep" vllm >/dev/null 2>&1; then
    record vllm unavailable "pip cannot resolve vllm here (pip install --dry-run vllm failed: offline, or no wheel for this Python)"
    return
  fi
  torch_change=$("$PY" - "$rep" <<'PYEOF'
import json, sys
from importlib import metadata
rep = json.load(open(sys.argv[1]))
new = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in rep.get("install", [])}
if "torch" in new:
    print(f"vllm {new.get('vllm', '?')} needs torch {new['torch']}, this machine has torch {metadata.version('torch')}")
PYEOF
)
  if [ -n "$torch_change" ]; then
    record vllm unavailable "$torch_change (not installed: it would replace the CUDA torch the other steps use)"
  elif "$PY" -m pip install -q vllm; then
    record vllm ok "pip install vllm"
  else
    record vllm unavailable "pip install vllm failed (see the log)"
  fi
}

run_all() {
  if [ "$INSTALL" = 1 ]; then
    echo "=== gpu_check.sh: installing the GPU extra"
    if [ ${#WHEELHOUSES[@]} -gt 0 ]; then
      install_offline
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    elif "$PY" -m pip install -q -e ".[gpu]"; then
      record project ok 'pip install -e .[gpu]'
    else
      record project failed 'pip install -e .[gpu] failed (offline? use --wheelhouse, see gpu_check.py --pack-wheels)'
    fi
    if [ "$VLLM" = 1 ]; then install_vllm; else record vllm skipped "--no-vllm"; fi
  else
    record project skipped "--no-install"
  fi
  # What the check imports; a line per missing module makes a broken install plain before any step runs.
  "$PY" - <<'PYEOF' | while IFS=$'\t' read -r a b c; do record "$a" "$b" "$c"; done
import importlib
for m in ("torch", "dagster", "dvc", "trl", "datasets", "deepspeed", "pipelines", "dagster_project"):
    try:
        mod = importlib.import_module(m)
        print(f"import:{m}\tok\t{getattr(mod, '__version__', '')}")
    except Exception as e:
        print(f"import:{m}\tfailed\t{type(e).__name__}: {str(e)[:200]}")
PYEOF
  record install_s ok "$(( $(date +%s) - T0 ))"
  [ -n "$COPY_TO" ] && cp -f "$REPORT" "$COPY_TO"/

  # --mirror-dir: the JSON also lands in COPY_TO after every step, so a run stopped by a time limit keeps its figures
  "$PY" bench/gpu_check.py --install-report "$REPORT" ${COPY_TO:+--mirror-dir "$COPY_TO"} "${PASS[@]}"
  local rc=$?
  echo "=== gpu_check.sh: exit $rc after $(( $(date +%s) - T0 )) s; results in $RESULTS/gpu_check.json"
  return $rc
}

# Everything, installs included, goes to the log (written into COPY_TO as it happens, for the same reason).
run_all 2>&1 | tee "$LOG" ${COPY_TO:+"$COPY_TO/gpu_check.log"}
rc=${PIPESTATUS[0]}
[ -n "$COPY_TO" ] && cp -f "$RESULTS"/gpu_check.json "$REPORT" "$COPY_TO"/ 2>/dev/null
rm -rf "$SHIM"
exit "$rc"
