"""Fault injection: SIGKILL at seeded random points during raw_cots, judged_cots, sft_checkpoint and eval_scores, run
through the real CLI (`python -m pipelines ...`) in temp workdirs.

For every stage: an uninterrupted reference run, then rounds in fresh copies of the same inputs where each run is
killed (kill -9) at a point drawn from a seeded RNG (`kill_plan`: a random delay after the start; the moment a randomly
chosen N-th shard file or trainer checkpoint directory appears; or the moment the DVC out path appears), rerun, maybe
killed again, until a run finishes by itself. Right after every kill the DVC out path must either not exist or be
complete, and every resumable shard on disk must be whole; after the last run the outputs must equal the reference's
(same ids in the same order, no duplicates, nothing missing, same content except wall times) and no leftover of a killed
write may remain beside them.

The RNG fixes which kill points are tried; what a delay hits depends on the machine's speed, so the sequence of states
differs between runs while the checks do not. FAULT_SEED=<n> draws other points. Kill counts per stage are printed
(`pytest -s`) and kept in KILLS.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import yaml

from conftest import ROOT, fake_params
from pipelines.io import read_jsonl

SEED = int(os.environ.get("FAULT_SEED", "1234"))  # FAULT_SEED=<n> draws other kill points
KILLS: Dict[str, int] = {}  # stage -> kills done in this test session (module-level tally)
ROUNDS: Dict[str, int] = {}  # stage -> fresh workdirs driven to completion
LITTER: List[str] = []  # temp dirs of interrupted atomic writes seen right after kills (cleaned by the rerun)
TORN_CHECKPOINTS: List[str] = []  # trainer checkpoints a kill cut short (resume must skip them)
CAT = "violence"
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
WALL_FIELDS = {"wall_s", "wall_time_s", "train_time_s"}  # legitimately differ between runs


# ---------------------------------------------------------------------------- workdirs and runs
def new_workdir(path: Path, params: dict) -> Path:
    path.mkdir(parents=True)
    for sub in ("data/spec", "data/prompts", "data/evals"):
        shutil.copytree(ROOT / sub, path / sub)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def cli(cwd: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"pipelines {' '.join(args)} failed:\n{proc.stderr[-3000:]}"


def timed_cli(cwd: Path, *args: str) -> float:
    t0 = time.monotonic()
    cli(cwd, *args)
    return time.monotonic() - t0


def copy_inputs(src: Path, dst: Path) -> Path:
    """A fresh workdir with everything of `src` (inputs, upstream outs, params); file mtimes kept."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@dataclass
class Stage:
    name: str
    args: List[str]
    progress: Callable[[Path], int]  # finished (or started, for checkpoints) units of work on disk now
    total: int  # units of an uninterrupted run
    check_after_kill: Callable[[Path], None]  # outs absent or complete, shards whole
    kill_log: List[str] = field(default_factory=list)


def _wait(proc: subprocess.Popen, until: Callable[[], bool], poll_s: float = 0.004, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not until() and time.monotonic() < deadline:
        time.sleep(poll_s)


KINDS = ("delay", "unit", "final")


def kill_plan(rng: random.Random, n: int) -> List[str]:
    """Kinds of the first `n` kill points: each kind once (in a seeded order), then seeded random kinds.

    delay: a random time after the start (often during imports or model loading);
    unit:  the moment a randomly chosen not-yet-done shard file / trainer checkpoint directory appears;
    final: the moment the DVC out path appears (the final write, or right after it)."""
    return (rng.sample(KINDS, len(KINDS)) + [rng.choice(KINDS) for _ in range(n)])[:n]


def drive(stage: Stage, cwd: Path, rng: random.Random, window_s: float, plan: List[str]) -> int:
    """Run the stage in `cwd`, SIGKILL it at the seeded points of `plan` (consumed), rerun until a run exits by itself.

    Returns the number of kills done (a run may finish before its kill point; that point is then used up)."""
    kills = 0
    for _ in range(len(plan) + 3):
        log = cwd.parent / f"{cwd.name}.{stage.name}.stderr"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "pipelines", *stage.args], cwd=cwd, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=err)
        if plan:
            kind, done = plan.pop(0), stage.progress(cwd)
            if kind == "unit" and done + 1 >= stage.total:
                kind = "final"
            if kind == "final" and done >= stage.total:
                kind = "delay"
            if kind == "delay":
                delay = rng.uniform(0.0, window_s)
                point = f"delay {delay:.2f}s"
                t_end = time.monotonic() + delay
                _wait(proc, lambda: time.monotonic() >= t_end)
            else:
                n = rng.randint(done + 1, stage.total - 1) if kind == "unit" else stage.total
                point = f"unit {n}/{stage.total}" if kind == "unit" else "out appears"
                _wait(proc, lambda: stage.progress(cwd) >= n, poll_s=0.004 if kind == "unit" else 0.0005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                stage.kill_log.append(f"{point} (units on disk after: {stage.progress(cwd)})")
                stage.check_after_kill(cwd)  # right after the kill: no half-written out is visible
                seen = [f"{stage.name}/{cwd.name}: {t}" for t in stray_temps(cwd)]
                LITTER.extend(t for t in seen if t not in LITTER)
                continue
            stage.kill_log.append(f"{point}: missed, run finished")
        rc = proc.wait(timeout=300)
        assert rc == 0, f"{stage.name} rerun failed (rc {rc}) after {kills} kills:\n{log.read_text()[-3000:]}"
        return kills
    raise AssertionError(f"{stage.name}: did not finish")


def kill_rounds(stage: Stage, base: Path, tmp: Path, quota: int, per_round: int, window_s: float,
                compare: Callable[[Path], None]) -> None:
    """Fresh copies of `base`, each driven to completion under kills, until `quota` kills were done in all."""
    rng = random.Random(f"{SEED}:{stage.name}")
    plan = kill_plan(rng, 3 * quota)
    kills = rounds = 0
    while kills < quota:
        assert plan, f"{stage.name}: kill points keep missing ({kills} kills in {rounds} rounds)"
        cwd = copy_inputs(base, tmp / f"round{rounds}")
        round_plan = plan[:min(per_round, quota - kills)]
        del plan[:len(round_plan)]
        round_plan.sort(key=lambda kind: kind == "final")  # after the out appears, later kills would hit a done run
        kills += drive(stage, cwd, rng, window_s, round_plan)
        compare(cwd)  # the finished run equals the uninterrupted one
        # Leftovers of killed writes are removed by the next write of the same file, which a finished run does for
        # every out and metrics file. In the work dir a shard that was renamed into place just before the kill is not
        # written again, so the (then empty) temp dir of its write may stay there; nothing else may.
        litter = stray_temps(cwd)
        kept = [t for t in litter if not t.startswith("data/.work/") or any((cwd / t).iterdir())]
        assert kept == [], f"{stage.name}: leftovers of killed writes after a finished run: {litter}"
        rounds += 1
    KILLS[stage.name] = KILLS.get(stage.name, 0) + kills
    ROUNDS[stage.name] = ROUNDS.get(stage.name, 0) + rounds
    print(f"\n[fault injection] {stage.name}: {kills} kills in {rounds} rounds; points: {'; '.join(stage.kill_log)}")


# ---------------------------------------------------------------------------- checks
def strip_wall(obj):
    if isinstance(obj, dict):
        return {k: strip_wall(v) for k, v in obj.items() if k not in WALL_FIELDS}
    return obj


def shard_files(work: Path) -> List[Path]:
    return sorted(work.glob("shard-*.jsonl")) if work.is_dir() else []


def shard_count(work_rel: str, out_rel: str) -> Callable[[Path], int]:
    """Units done: shard files, plus one when the out path exists (a kill point right as the final write lands)."""
    return lambda cwd: len(shard_files(cwd / work_rel)) + (cwd / out_rel).exists()


def assert_jsonl_out(cwd: Path, rel: str, expected: List[dict], must_exist: bool) -> None:
    """The out is absent (allowed only right after a kill) or holds exactly the reference records."""
    path = cwd / rel
    if not path.exists():
        assert not must_exist, f"{rel} missing after a finished run"
        return
    rows = read_jsonl(path)  # a torn file would fail here (invalid JSON) or below (fewer rows)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{rel}: duplicate ids"
    assert ids == [r["id"] for r in expected], f"{rel}: ids differ from the uninterrupted run (missing/reordered)"
    assert rows == expected, f"{rel}: records differ from the uninterrupted run"


def assert_metrics(cwd: Path, rel: str, expected: dict, must_exist: bool) -> None:
    path = cwd / rel
    if not path.exists():
        assert not must_exist, f"{rel} missing after a finished run"
        return
    assert strip_wall(json.loads(path.read_text())) == strip_wall(expected), rel


def assert_shards_whole(cwd: Path, work_rel: str, ref_work: Path) -> None:
    """Every shard file on disk is byte-identical to the reference run's shard of the same index (none is torn)."""
    for f in shard_files(cwd / work_rel):
        assert f.read_bytes() == (ref_work / f.name).read_bytes(), f"{work_rel}/{f.name} differs from the reference"


def stray_temps(cwd: Path) -> List[str]:
    """Leftovers of atomic writes that a SIGKILL interrupted: temp dirs (or moved-aside old dirs) beside their
    destinations. Each later write of the same destination removes them, so a finished run leaves none."""
    found = [p for pat in (".*.tmp", ".*.old", ".*.staging") for p in (cwd / "data").rglob(pat)]
    return sorted(str(p.relative_to(cwd)) for p in found)


# ---------------------------------------------------------------------------- raw_cots and judged_cots (fake backend)
def test_kill_raw_cots(tmp_path):
    p = fake_params(categories=[CAT])
    p["raw_cots"].update(max_prompts=14, shard_size=1, n_samples=2, generator={"kind": "fake", "delay_s": 0.04})
    base = new_workdir(tmp_path / "base", p)
    cli(base, "spec_chunks", "--category", CAT)
    ref = copy_inputs(base, tmp_path / "ref")
    window = timed_cli(ref, "raw_cots", "--category", CAT)
    out, met, work = f"data/raw_cots/{CAT}.jsonl", f"data/metrics/raw_cots/{CAT}.json", f"data/.work/raw_cots/{CAT}"
    expected, expected_m = read_jsonl(ref / out), json.loads((ref / met).read_text())
    assert len(expected) == 28 and len(shard_files(ref / work)) == 14

    def after_kill(cwd: Path) -> None:
        assert_jsonl_out(cwd, out, expected, must_exist=False)
        assert_metrics(cwd, met, expected_m, must_exist=False)
        assert_shards_whole(cwd, work, ref / work)

    def compare(cwd: Path) -> None:
        assert_jsonl_out(cwd, out, expected, must_exist=True)
        assert_metrics(cwd, met, expected_m, must_exist=True)
        assert_shards_whole(cwd, work, ref / work)
        assert len(shard_files(cwd / work)) == 14

    stage = Stage("raw_cots", ["raw_cots", "--category", CAT], shard_count(work, out), 15, after_kill)
    kill_rounds(stage, base, tmp_path, quota=9, per_round=4, window_s=window, compare=compare)


def test_kill_judged_cots(tmp_path):
    p = fake_params(categories=[CAT])
    p["raw_cots"].update(max_prompts=14, n_samples=10, generator={"kind": "fake"})  # 140 samples: 5 judge shards of 32
    p["judged_cots"]["judge"] = {"kind": "llm", "backend": {"kind": "fake", "delay_s": 0.25}, "k": 2}
    base = new_workdir(tmp_path / "base", p)
    cli(base, "spec_chunks", "--category", CAT)
    cli(base, "raw_cots", "--category", CAT)
    ref = copy_inputs(base, tmp_path / "ref")
    window = timed_cli(ref, "judged_cots", "--category", CAT)
    out, met = f"data/judged_cots/{CAT}.jsonl", f"data/metrics/judged_cots/{CAT}.json"
    work = f"data/.work/judged_cots/{CAT}"
    expected, expected_m = read_jsonl(ref / out), json.loads((ref / met).read_text())
    assert len(expected) == 140 and len(shard_files(ref / work)) == 5
    assert all(len(r["scores"]) == 2 for r in expected if r["parse_ok"])  # the LLM judge (fake backend) did the work

    def after_kill(cwd: Path) -> None:
        assert_jsonl_out(cwd, out, expected, must_exist=False)
        assert_metrics(cwd, met, expected_m, must_exist=False)
        assert_shards_whole(cwd, work, ref / work)

    def compare(cwd: Path) -> None:
        assert_jsonl_out(cwd, out, expected, must_exist=True)
        assert_metrics(cwd, met, expected_m, must_exist=True)
        assert_shards_whole(cwd, work, ref / work)

    stage = Stage("judged_cots", ["judged_cots", "--category", CAT], shard_count(work, out), 6, after_kill)
    kill_rounds(stage, base, tmp_path, quota=6, per_round=3, window_s=window, compare=compare)


# ---------------------------------------------------------------------------- sft_checkpoint (tiny model)
SFT_STEPS = 6
SYSTEM = "You are a helpful assistant. Reason inside <think></think>, then answer."


def sft_rows(n: int) -> List[dict]:
    return [{"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"How do I sharpen kitchen knife number {i}?"},
        {"role": "assistant", "content": f"<think>\nV.1 applies to request {i}: full_compliance.\n</think>\nUse a "
                                         f"whetstone, pass {i}."},
    ]} for i in range(n)]


def checkpoint_step(cwd: Path) -> int:
    """Highest trainer checkpoint directory that exists (complete or still being written); SFT_STEPS + 1 once the out
    directory exists."""
    if (cwd / "data/sft_checkpoint").exists():
        return SFT_STEPS + 1
    work = cwd / "data/.work/sft_checkpoint"
    steps = [int(m.group(1)) for p in (work.iterdir() if work.is_dir() else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return max(steps, default=0)


def safetensors_ok(path: Path) -> bool:
    """The file is a whole safetensors file: its header parses and the data it describes is all there."""
    raw = path.read_bytes()
    if len(raw) < 8:
        return False
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return len(raw) == 8 + n + end


def test_kill_sft_checkpoint(tmp_path):
    from tiny_model import make_tiny_model

    p = fake_params(categories=[CAT])
    p["sft_dataset"]["system_prompt"] = SYSTEM
    p["sft_checkpoint"].update(max_steps=SFT_STEPS, save_steps=1, save_total_limit=1, per_device_batch_size=2,
                               epochs=1.0, learning_rate=1e-3, lr_scheduler="constant", warmup_ratio=0.0)
    base = new_workdir(tmp_path / "base", p)
    make_tiny_model(base / "data/base_model")
    ds = base / "data/sft_dataset/train.jsonl"
    ds.parent.mkdir(parents=True)
    ds.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(2 * SFT_STEPS)))
    ref = copy_inputs(base, tmp_path / "ref")
    window = timed_cli(ref, "sft_checkpoint")
    out = "data/sft_checkpoint"
    ref_files = sorted(f.name for f in (ref / out).iterdir())
    ref_summary = json.loads((ref / out / "training_summary.json").read_text())
    assert ref_summary["metrics"]["steps"] == SFT_STEPS and "model.safetensors" in ref_files

    def after_kill(cwd: Path) -> None:
        work = cwd / "data/.work/sft_checkpoint"
        torn = [f"{cwd.name}/{c.name}" for c in sorted(work.glob("checkpoint-*"))
                if not (c / "trainer_state.json").is_file()]
        new = [t for t in torn if t not in TORN_CHECKPOINTS]
        if new:  # killed while the trainer was writing this checkpoint: the rerun must not resume from it
            TORN_CHECKPOINTS.extend(new)
            stage.kill_log.append(f"left torn {', '.join(new)}")
        out_complete(cwd)

    def out_complete(cwd: Path) -> None:
        d = cwd / out
        if not d.exists():
            return
        assert sorted(f.name for f in d.iterdir()) == ref_files, f"{out} has other files than the reference"
        assert safetensors_ok(d / "model.safetensors"), "torn model.safetensors"
        assert json.loads((d / "training_summary.json").read_text())["metrics"]["steps"] == SFT_STEPS

    def compare(cwd: Path) -> None:
        from pipelines.backends.local import load_model

        out_complete(cwd)
        d = cwd / out
        summary = json.loads((d / "training_summary.json").read_text())
        assert summary["metrics"]["steps"] == ref_summary["metrics"]["steps"]
        assert summary["metrics"]["tokens_seen"] == ref_summary["metrics"]["tokens_seen"]
        # same logged steps in the same order, none missing or repeated after resumes
        assert [r["step"] for r in summary["loss_curve"]] == [r["step"] for r in ref_summary["loss_curve"]]
        for name in ref_files:  # config, tokenizer, chat template: byte-identical
            if name not in ("model.safetensors", "training_summary.json"):
                assert (d / name).read_bytes() == (ref / out / name).read_bytes(), name
        # On CPU with this seed, a resumed run restores optimizer, scheduler, RNG state and the data order from the
        # trainer checkpoint; we checked that the weights and the loss curve then come out bitwise identical to the
        # uninterrupted run (tiny Llama, no dropout, one thread), so it is asserted here.
        assert (d / "model.safetensors").read_bytes() == (ref / out / "model.safetensors").read_bytes()
        assert [r["loss"] for r in summary["loss_curve"]] == [r["loss"] for r in ref_summary["loss_curve"]]
        model, tok = load_model(d)  # reloads through the pipeline's safetensors-only loader
        assert model.config.num_hidden_layers == 2 and tok.chat_template

    stage = Stage("sft_checkpoint", ["sft_checkpoint"], checkpoint_step, SFT_STEPS + 1, after_kill)
    kill_rounds(stage, base, tmp_path, quota=4, per_round=4, window_s=window, compare=compare)


# ---------------------------------------------------------------------------- eval_scores (tiny model)
def test_kill_eval_scores(tmp_path):
    from tiny_model import make_tiny_model

    p = fake_params(categories=[CAT, "self_harm"])
    p["eval_scores"] = {
        "generator": {"kind": "transformers", "batch_size": 2},
        "sampling": {"temperature": 0.0, "max_new_tokens": 24},
        "sets": {"harmful": 2, "benign": 2, "jailbreak": 1, "transforms": ["rot13", "roleplay"], "transformations": 0,
                 "multilingual": 0},
        "shard_size": 1,
    }
    base = new_workdir(tmp_path / "base", p)
    make_tiny_model(base / "data/base_model")
    ref = copy_inputs(base, tmp_path / "ref")
    window = timed_cli(ref, "eval_scores", "--model", "base")
    out, met, work = "data/eval_scores/base", "data/metrics/eval_scores/base.json", "data/.work/eval_scores/base"
    expected, expected_m = read_jsonl(ref / out / "results.jsonl"), json.loads((ref / met).read_text())
    n_items = 12  # per category 2 harmful + 2 benign + 1 harmful x 2 transforms
    assert len(expected) == n_items and len(shard_files(ref / work)) == n_items
    assert sorted(f.name for f in (ref / out).iterdir()) == ["results.jsonl"]

    def after_kill(cwd: Path) -> None:
        d = cwd / out
        if d.exists():  # the out directory holds the whole results file and nothing else
            assert sorted(f.name for f in d.iterdir()) == ["results.jsonl"], sorted(f.name for f in d.iterdir())
        assert_jsonl_out(cwd, f"{out}/results.jsonl", expected, must_exist=False)
        assert_metrics(cwd, met, expected_m, must_exist=False)
        assert_shards_whole(cwd, work, ref / work)

    def compare(cwd: Path) -> None:
        assert sorted(f.name for f in (cwd / out).iterdir()) == ["results.jsonl"]
        assert_jsonl_out(cwd, f"{out}/results.jsonl", expected, must_exist=True)
        assert_metrics(cwd, met, expected_m, must_exist=True)
        assert_shards_whole(cwd, work, ref / work)

    stage = Stage("eval_scores", ["eval_scores", "--model", "base"], shard_count(work, out), n_items + 1, after_kill)
    kill_rounds(stage, base, tmp_path, quota=4, per_round=3, window_s=window, compare=compare)


def test_zz_kill_tally():
    """Summary of the session (runs last in this file): at least 20 kills when all four stages ran."""
    print(f"\n[fault injection] kills per stage: {KILLS} (total {sum(KILLS.values())}); rounds: {ROUNDS}; "
          f"torn trainer checkpoints left by kills: {TORN_CHECKPOINTS}; "
          f"temp leftovers seen right after kills (removed by the reruns): {LITTER}")
    if len(KILLS) == 4:
        assert sum(KILLS.values()) >= 20
