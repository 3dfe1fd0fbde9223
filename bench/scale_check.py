"""The Python half of `make scale-check` (bench/scale_check.sh starts and stops the processes; this file decides and
measures). Subcommands, in the order the shell script calls them:

    prepare         overlay a clean clone with a small workload, commit it, write the local Celery run config
    wait-workers    block until N Celery workers answer a ping on the broker
    run             launch `data_only` (one category) and, once base_model is in, `evaluate` (one model) with the
                    Celery executor; watch the `dvc` pool; then read the step events back and report what ran where,
                    whether any two DVC steps overlapped and which step waited for the pool
    second-machine  commit the results, `dvc push` to a local remote, clone again, `dvc pull`, `audit`

Only configuration differs from a local run: DAGSTER_EXECUTOR=celery selects the executor in
dagster_project.build, and the run config is configs/dagster/run_celery.yaml with the broker and result backend
pointed at the local redis. The definitions, the instance settings (configs/dagster/dagster.yaml, whose pool
`dvc` has one slot) and the stages are the clone's own.

Why the workload is smaller than params.yaml's: the machine this was written on has 2 CPU cores and generation with the
embedded 135M model is the slow part; what is being checked is where steps run and in which order, not the
generations. The overlay (OVERLAY below) keeps the real generator and model, one category, two prompts, one sample,
short generations, one eval item per set, and the dvc.yaml stages the two jobs need (the rest would make `audit`
fail as "never reproduced").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

CATEGORY = "violence"
MODEL = "base"
JOBS = (("data_only", CATEGORY), ("evaluate", MODEL))
# dotted params.yaml key -> value. A key that the clone's params.yaml does not have is left out (and said so):
# the schema rejects unknown keys, and the project may have moved on since this list was written.
OVERLAY: Dict[str, Any] = {
    "categories": [CATEGORY],
    "raw_cots.max_prompts": 2,
    "raw_cots.n_samples": 1,
    "raw_cots.shard_size": 2,
    "raw_cots.sampling.max_new_tokens": 32,
    "raw_cots.cot_max_tokens": 24,
    # keep every judged sample: with 2 short generations the rubric may keep none, and an empty sft_dataset fails
    # its non-empty asset check (then `audit` fails on Dagster's check results, which is not what is tested here)
    "judged_cots.judge.threshold": 0.0,
    "eval_scores.models": {MODEL: "data/base_model"},
    "eval_scores.sets.harmful": 1,
    "eval_scores.sets.benign": 1,
    "eval_scores.sets.jailbreak": 0,
    "eval_scores.sets.transformations": 0,
    "eval_scores.sets.multilingual": 0,
    "eval_scores.sampling.max_new_tokens": 32,
    "report.models": [MODEL],
}
TARGETS = ("sft_dataset", f"eval_scores@{MODEL}")  # the items the two jobs end at
POOL = "dvc"


def sh(args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, check: bool = True) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"`{' '.join(args)}` failed ({proc.returncode}) in {cwd}:\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def node_env(node: Path, **extra: str) -> Dict[str, str]:
    """What a worker machine would have: the project's code and DVC workspace at `node`, the celery executor."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(node), "DVC_PROJECT_DIR": str(node), "DAGSTER_EXECUTOR": "celery",
                "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ prepare
def set_dotted(doc: Dict[str, Any], dotted: str, value: Any) -> bool:
    node = doc
    *head, last = dotted.split(".")
    for k in head:
        if not isinstance(node.get(k), dict):
            return False
        node = node[k]
    if last not in node:
        return False
    node[last] = value
    return True


def prepare(args: argparse.Namespace) -> None:
    node, remote = Path(args.node).resolve(), Path(args.remote).resolve()
    params = yaml.safe_load((node / "params.yaml").read_text())
    skipped = [k for k, v in OVERLAY.items() if not set_dotted(params, k, v)]
    (node / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The stages the two jobs need: everything upstream of their last items, found from the clone's own dvc.yaml
    # (so a stage added upstream later comes along), with the overlaid params.
    sys.path.insert(0, str(node))
    from dagster_project.manifest import DvcManifest

    manifest = DvcManifest.load(node)
    items, todo = set(TARGETS), list(TARGETS)
    while todo:  # upstream_items gives the direct producers; walk to the roots
        for up in manifest.upstream_items(todo.pop()):
            if up not in items:
                items.add(up)
                todo.append(up)
    stages = {manifest.items[i].stage for i in items}
    dvc_yaml = yaml.safe_load((node / "dvc.yaml").read_text())
    dropped = [s for s in dvc_yaml["stages"] if s not in stages]
    (node / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: v for k, v in dvc_yaml["stages"].items()
                                                              if k in stages}}, sort_keys=False))
    remote.mkdir(parents=True, exist_ok=True)
    # --local: .dvc/config.local is git-ignored, so the remote does not dirty the tree `audit` checks
    sh([sys.executable, "-m", "dvc", "remote", "add", "--local", "-f", "-d", "scale", str(remote)], node)
    sh(["git", "-c", "user.name=scale-check", "-c", "user.email=scale-check@example.invalid", "commit", "-qam",
        "scale-check: small workload overlay (bench/scale_check.py)"], node)
    # The local run config: the project's run_celery.yaml with the broker and result backend of this machine.
    run_config = yaml.safe_load((node / "configs/dagster/run_celery.yaml").read_text())
    run_config["execution"]["config"].update({"broker": args.broker, "backend": args.backend})
    Path(args.out_config).write_text(yaml.safe_dump(run_config, sort_keys=False))
    print(f"clone      {node} at {sh(['git', 'rev-parse', '--short', 'HEAD~1'], node).strip()} + overlay commit")
    print(f"stages     {', '.join(sorted(stages, key=list(dvc_yaml['stages']).index))} "
          f"(left out: {', '.join(dropped) or '-'})")
    print("overlay    " + ", ".join(f"{k}={json.dumps(v)}" for k, v in OVERLAY.items() if k not in skipped)
          + (f" (not in this params.yaml, skipped: {', '.join(skipped)})" if skipped else ""))
    print(f"run config {args.out_config}: configs/dagster/run_celery.yaml with broker/backend {args.broker}")


# ------------------------------------------------------------------------------------------------ workers
def celery_app(run_config: Path) -> Any:
    from dagster_celery.cli import get_app

    return get_app(str(run_config))


def wait_workers(args: argparse.Namespace) -> None:
    app = celery_app(Path(args.config))
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        names = sorted(n for r in replies for n in r)
        if len(names) >= args.count:
            print(f"workers    {', '.join(names)} answer on the broker")
            return
        time.sleep(1)
    raise SystemExit(f"only {len(names)} of {args.count} Celery workers answered within {args.timeout} s")


# ------------------------------------------------------------------------------------------------ run
@dataclass
class Step:
    job: str
    run_id: str
    key: str
    submitted: Optional[float] = None
    start: Optional[float] = None
    end: Optional[float] = None
    ok: Optional[bool] = None
    worker: str = "?"
    pid: Optional[int] = None
    items: List[str] = field(default_factory=list)
    queued_at: Optional[float] = None  # first seen waiting for the pool while another step held it
    queued_behind: str = ""


def launch(job: str, partition: str, config: Path, node: Path, logs: Path) -> subprocess.Popen:
    """`dagster job execute` as a user would type it; the process is the run's orchestrator (the Celery executor
    loop), the steps run on whichever worker takes them from the broker."""
    cmd = [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "dagster_project.definitions",
           "-j", job, "-c", str(config), "--tags", json.dumps({"dagster/partition": partition, "scale_check": job})]
    log = (logs / f"run_{job}.log").open("w")
    return subprocess.Popen(cmd, cwd=node, env=node_env(node), stdout=log, stderr=subprocess.STDOUT)


def run_of(instance: Any, job: str) -> Optional[Any]:
    import dagster as dg

    runs = instance.get_runs(dg.RunsFilter(tags={"scale_check": job}), limit=1)
    return runs[0] if runs else None


def materialized(instance: Any, run_id: str, stage: str) -> bool:
    import dagster as dg

    for rec in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        if rec.dagster_event.asset_key.path[-1] == stage:
            return True
    return False


def run(args: argparse.Namespace) -> None:
    import dagster as dg

    node, config, logs = Path(args.node).resolve(), Path(args.config).resolve(), Path(args.logs).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    instance = dg.DagsterInstance.get()
    t0 = time.time()
    procs = {"data_only": launch("data_only", CATEGORY, config, node, logs)}
    snapshots: List[Tuple[float, List[Tuple[str, str]], List[Tuple[str, str]]]] = []
    # Poll the pool table of the instance while the runs go: it is where Dagster records who holds the slot and
    # who waits for it, and under Celery nothing else logs a wait (the Celery loop emits no "blocked" event).
    while True:
        info = instance.event_log_storage.get_concurrency_info(POOL)
        claimed = [(c.run_id, c.step_key) for c in info.claimed_slots]
        pending = [(p.run_id, p.step_key) for p in info.pending_steps if p.assigned_timestamp is None]
        if not snapshots or snapshots[-1][1:] != (claimed, pending):
            snapshots.append((time.time(), claimed, pending))
        first_done = procs["data_only"].poll() is not None
        if "evaluate" not in procs and not args.no_eval:
            first = run_of(instance, "data_only")
            # eval_scores@base reads data/base_model: start the second run once the first has produced it, while
            # the first still has DVC steps to go, so both runs compete for the one slot (or after it, should the
            # first run have ended before the materialization was seen)
            if (first is not None and materialized(instance, first.run_id, "base_model")) or \
                    (first_done and procs["data_only"].returncode == 0):
                procs["evaluate"] = launch("evaluate", MODEL, config, node, logs)
        if all(p.poll() is not None for p in procs.values()) and (
                "evaluate" in procs or args.no_eval or procs["data_only"].returncode != 0):
            break
        if time.time() - t0 > args.timeout:
            for p in procs.values():
                p.terminate()
            raise SystemExit(f"the runs took longer than {args.timeout} s; logs in {logs}")
        time.sleep(0.25)
    wall = time.time() - t0
    steps = collect(instance, [j for j, _ in JOBS if j in procs], snapshots)
    report(instance, steps, snapshots, procs, t0, wall, Path(args.summary), logs)


def collect(instance: Any, jobs: List[str], snapshots: List[Tuple[float, Any, Any]]) -> List[Step]:
    """Per step: worker, pid, submit/start/end from the run's event log (the worker writes STEP_START/SUCCESS)."""
    import dagster as dg

    E = dg.DagsterEventType
    steps: Dict[Tuple[str, str], Step] = {}
    job_of: Dict[str, str] = {}
    for job in jobs:
        r = run_of(instance, job)
        if r is None:
            continue
        job_of[r.run_id] = job
        for rec in instance.all_logs(r.run_id):
            ev = rec.dagster_event
            if ev is None or not rec.step_key:
                continue
            s = steps.setdefault((r.run_id, rec.step_key), Step(job, r.run_id, rec.step_key))
            t = rec.timestamp
            if ev.event_type == E.STEP_START and s.start is None:
                s.start, s.pid = t, ev.pid
            elif ev.event_type in (E.STEP_SUCCESS, E.STEP_FAILURE) and s.end is None:
                s.end, s.ok = t, ev.event_type == E.STEP_SUCCESS
            elif ev.event_type == E.ASSET_MATERIALIZATION:
                mat = ev.event_specific_data.materialization
                reused = (mat.metadata.get("dvc/reused") or dg.MetadataValue.bool(False)).value
                item = ev.asset_key.path[-1] + (f"@{mat.partition}" if mat.partition else "")
                if item not in [i.split(" ")[0] for i in s.items]:
                    s.items.append(item + (" (reused)" if reused else ""))
            elif ev.event_type == E.ENGINE_EVENT and ev.engine_event_data is not None:
                md = ev.engine_event_data.metadata or {}
                if "Celery worker" in md:
                    s.worker = str(md["Celery worker"].value)
                elif (rec.user_message or "").startswith("Submitting celery task") and s.submitted is None:
                    s.submitted = t
    for t, claimed, pending in snapshots:
        for run_id, key in pending:
            s = steps.get((run_id, key))
            holders = [f"{job_of.get(r, r[:8])}:{k}" for r, k in claimed if (r, k) != (run_id, key)]
            if s is not None and s.queued_at is None and holders:
                s.queued_at, s.queued_behind = t, ", ".join(holders)
    return sorted(steps.values(), key=lambda s: (s.start or float("inf")))


def overlaps(steps: List[Step]) -> List[str]:
    found = []
    timed = [s for s in steps if s.start is not None and s.end is not None]
    for i, a in enumerate(timed):
        for b in timed[i + 1:]:
            if a.start < b.end and b.start < a.end:
                found.append(f"{a.job}:{a.key} [{a.start:.2f}, {a.end:.2f}] and {b.job}:{b.key} "
                             f"[{b.start:.2f}, {b.end:.2f}]")
    return found


def report(instance: Any, steps: List[Step], snapshots: List[Any], procs: Dict[str, subprocess.Popen], t0: float,
           wall: float, summary_path: Path, logs: Path) -> None:
    def rel(t: Optional[float]) -> str:
        return f"{t - t0:7.1f}" if t is not None else "      -"

    print("\nSTEPS (times in s since the first launch; every step below runs `dvc repro` and is in pool `dvc`)")
    print(f"{'job':<10} {'step':<24} {'worker':<14} {'pid':>7} {'submit':>7} {'start':>7} {'end':>7} {'dur':>6}"
          f"  items")
    for s in steps:
        dur = f"{s.end - s.start:6.1f}" if s.start and s.end else "     -"
        print(f"{s.job:<10} {s.key:<24} {s.worker:<14} {s.pid or '-':>7} {rel(s.submitted)} {rel(s.start)} "
              f"{rel(s.end)} {dur}  {', '.join(s.items)}{'' if s.ok else '  FAILED'}")
    per_worker: Dict[str, int] = {}
    for s in steps:
        per_worker[s.worker] = per_worker.get(s.worker, 0) + 1
    print("\nsteps per worker: " + ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items())))
    bad = overlaps(steps)
    timed = [s for s in steps if s.start is not None and s.end is not None]
    gaps = [b.start - a.end for a, b in zip(timed, timed[1:])]
    if bad:
        print("OVERLAP: two DVC steps ran at the same time:\n  " + "\n  ".join(bad))
    else:
        print(f"no overlap: {len(timed)} DVC steps, each STEP_START after the previous STEP_SUCCESS "
              f"(smallest gap {min(gaps):.2f} s)" if gaps else "no overlap (one step)")
    waited = [s for s in steps if s.queued_at is not None]
    for s in waited:
        print(f"pool wait: {s.job}:{s.key} queued for pool `{POOL}` at {rel(s.queued_at).strip()} s while "
              f"{s.queued_behind} held the slot; started at {rel(s.start).strip()} s "
              f"(waited {s.start - s.queued_at:.1f} s), " + ("succeeded" if s.ok else "FAILED"))
    max_claimed = max((len(c) for _, c, _ in snapshots), default=0)
    print(f"pool table: {len(snapshots)} distinct states seen, at most {max_claimed} slot(s) claimed at once")
    lock_lines = [ln for f in sorted(logs.glob("*.log")) for ln in f.read_text(errors="replace").splitlines()
                  if "Unable to acquire lock" in ln]
    runs_ok = {}
    for job, p in procs.items():
        r = run_of(instance, job)
        runs_ok[job] = (p.returncode == 0 and r is not None and r.status.value == "SUCCESS")
        print(f"run {job}: {r.status.value if r else 'not created'} (run id {r.run_id if r else '-'}; "
              f"dagster job execute exit {p.returncode}; log {logs / f'run_{job}.log'})")
    print(f"DVC lock: {len(lock_lines)} 'Unable to acquire lock' line(s) in the run and worker logs")
    busy = sum(s.end - s.start for s in timed)
    print(f"wall time of the runs: {wall:.1f} s (first launch to last run end); DVC steps {busy:.1f} s, the rest "
          f"{wall - busy:.1f} s is Dagster + Celery (process starts, task hand-off, 1 s Celery poll, slot claims)")
    print(f"SUMMARY scale_check: {len(steps)} DVC steps of {len(procs)} runs on "
          f"{len([w for w in per_worker if w != '?'])} Celery workers ("
          + ", ".join(f"{w} {n}" for w, n in sorted(per_worker.items())) + f"), {len(bad)} overlaps, "
          f"{len(waited)} steps queued behind the pool, runs {wall:.0f} s")
    summary = {"wall_s": round(wall, 2), "steps": [asdict(s) for s in steps], "per_worker": per_worker,
               "overlaps": bad, "waited": [f"{s.job}:{s.key}" for s in waited], "runs_ok": runs_ok,
               "max_claimed": max_claimed, "dvc_lock_errors": lock_lines}
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    problems = []
    if not all(runs_ok.values()) or any(not s.ok for s in steps):
        problems.append("a run or step failed")
    if bad or max_claimed > 1:
        problems.append("DVC steps overlapped")
    if lock_lines:
        problems.append("DVC reported its lock busy")
    if len([w for w in per_worker if w != "?"]) < 2:
        # not a failure of the pool, but then the run did not show steps moving between machines
        print("note: every step landed on one worker this time")
    if problems:
        raise SystemExit("scale-check FAILED: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------ second machine
def second_machine(args: argparse.Namespace) -> None:
    node, clone, remote = Path(args.node).resolve(), Path(args.clone).resolve(), Path(args.remote).resolve()
    env = node_env(node)
    git = ["git", "-c", "user.name=scale-check", "-c", "user.email=scale-check@example.invalid"]
    sh([*git, "add", "-A"], node)
    sh([*git, "commit", "-qm", "scale-check: dvc.lock and metrics of the Celery runs"], node, check=False)
    dirty = sh(["git", "status", "--porcelain"], node).strip()
    if dirty:
        raise SystemExit(f"{node} has files outside git and .gitignore after the runs:\n{dirty}")
    t = time.time()
    out = sh([sys.executable, "-m", "dvc", "push"], node, env=env)
    print(f"dvc push   {out.strip().splitlines()[-1]} -> {remote} ({time.time() - t:.1f} s)")
    sh(["git", "clone", "-q", str(node), str(clone)], node.parent)
    env2 = node_env(clone)
    sh([sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "scale", str(remote)], clone, env=env2)
    t = time.time()
    out = sh([sys.executable, "-m", "dvc", "pull"], clone, env=env2)
    print(f"dvc pull   {out.strip().splitlines()[-1]} ({time.time() - t:.1f} s, in {clone})")
    if "Running stage" in out:
        raise SystemExit("dvc pull ran a stage")
    status = sh([sys.executable, "-m", "dvc", "status"], clone, env=env2).strip()
    print(f"dvc status {status}")
    lock_before = (clone / "dvc.lock").read_bytes()
    # The audit reads the shared Dagster instance too: its latest data versions must equal the pulled dvc.lock.
    proc = subprocess.run([sys.executable, "-m", "dagster_project", "audit", "--dagster-home", args.dagster_home],
                          cwd=clone, env=env2, capture_output=True, text=True)
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        raise SystemExit(f"audit failed on the second clone (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    if (clone / "dvc.lock").read_bytes() != lock_before or "up to date" not in status:
        raise SystemExit("the second clone was not up to date from the pull alone")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--node", required=True)
    a.add_argument("--remote", required=True)
    a.add_argument("--broker", required=True)
    a.add_argument("--backend", required=True)
    a.add_argument("--out-config", required=True)
    a = sub.add_parser("wait-workers")
    a.add_argument("--config", required=True)
    a.add_argument("--count", type=int, default=2)
    a.add_argument("--timeout", type=float, default=120)
    a = sub.add_parser("run")
    a.add_argument("--node", required=True)
    a.add_argument("--config", required=True)
    a.add_argument("--logs", required=True)
    a.add_argument("--summary", required=True)
    a.add_argument("--no-eval", action="store_true", help="only the data_only run")
    a.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    a = sub.add_parser("second-machine")
    a.add_argument("--node", required=True)
    a.add_argument("--clone", required=True)
    a.add_argument("--remote", required=True)
    a.add_argument("--dagster-home", required=True)
    args = p.parse_args(argv)
    {"prepare": prepare, "wait-workers": wait_workers, "run": run, "second-machine": second_machine}[args.cmd](args)


if __name__ == "__main__":
    main()
