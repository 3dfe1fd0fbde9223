"""Asset checks as plain functions: (root, stage item, manifest) in, pass/fail + metadata out. No Dagster import.

`CHECKS_BY_STAGE` is the one table that says which check runs on which dvc.yaml stage; the translator turns each entry
into an `AssetCheckSpec` (partitioned like its asset) and the DVC multi-asset runs it right after the item it checks.
Every outcome's metadata shows the observed value next to the threshold it was compared with.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from pipelines import catalog

from .manifest import DvcManifest, StageItem, lookup


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DvcCheck:
    name: str
    description: str
    fn: Callable[[DvcManifest, StageItem], CheckOutcome]
    blocking: bool = False  # a failed blocking check stops downstream assets (in the same step and later steps)
    # True: a pass is remembered per dvc.lock record of the item (see OutcomeCache); only for checks that read
    # nothing but the item's own outs and deps, and cost enough to matter (loading a checkpoint, generating)
    cacheable: bool = False


# ------------------------------------------------------------------------------------------------ helpers
def data_files(root: Path, item: StageItem, suffix: str) -> List[Path]:
    """Files with `suffix` among the item's artifact outs (files, or files inside out directories)."""
    found: List[Path] = []
    for out in item.data_outs:
        p = root / out.path
        if p.is_file() and p.suffix == suffix:
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(f for f in p.rglob(f"*{suffix}") if f.is_file()))
    return found


def _rows(path: Path) -> Iterable[Tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, json.loads(line)


def _rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


# ------------------------------------------------------------------------------------------------ jsonl schema
def jsonl_schema(required: Sequence[str], extra: Optional[Callable[[dict], Optional[str]]] = None,
                 min_rows: int = 1) -> Callable[[DvcManifest, StageItem], CheckOutcome]:
    """Every row of every JSONL out is an object with the `required` fields (and passes `extra`); at least `min_rows`."""

    def check(manifest: DvcManifest, item: StageItem) -> CheckOutcome:
        files = data_files(manifest.root, item, ".jsonl")
        meta: Dict[str, Any] = {"required_fields": ", ".join(required), "min_rows": min_rows,
                                "files": ", ".join(_rel(manifest.root, f) for f in files) or "(none)"}
        if not files:
            return CheckOutcome(False, f"{item.name}: no .jsonl file among its outs", {**meta, "rows": 0})
        rows = 0
        for f in files:
            try:
                for n, row in _rows(f):
                    rows += 1
                    where = f"{_rel(manifest.root, f)}:{n}"
                    if not isinstance(row, dict):
                        return CheckOutcome(False, f"{where}: row is not a JSON object", {**meta, "bad_row": where})
                    missing = [k for k in required if k not in row]
                    problem = f"missing fields {missing}" if missing else (extra(row) if extra else None)
                    if problem:
                        return CheckOutcome(False, f"{where}: {problem}", {**meta, "bad_row": where, "rows_read": rows})
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return CheckOutcome(False, f"{_rel(manifest.root, f)}: not valid JSONL ({e})", meta)
        ok = rows >= min_rows
        return CheckOutcome(ok, f"{rows} rows, schema ok" if ok else f"{rows} rows < {min_rows}",
                            {**meta, "rows": rows})

    return check


def _chat_messages(row: dict) -> Optional[str]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages is not a non-empty list"
    if any(not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str) for m in msgs):
        return "a message lacks role/content"
    if msgs[-1]["role"] != "assistant":
        return f"last message is {msgs[-1]['role']!r}, not the assistant turn"
    return None


# ------------------------------------------------------------------------------------------------ judge pass rate
def keep_rate_in_bounds(manifest: DvcManifest, item: StageItem) -> CheckOutcome:
    """kept/total of the judged samples lies within params.yaml `judged_cots.pass_rate_bounds`."""
    try:
        low, high = (float(x) for x in lookup(manifest.params, "judged_cots.pass_rate_bounds"))
    except (KeyError, TypeError, ValueError):
        low, high = 0.0, 1.0
    total = kept = 0
    for f in data_files(manifest.root, item, ".jsonl"):
        for _, row in _rows(f):
            total += 1
            kept += bool(row.get("kept"))
    rate = kept / total if total else 0.0
    meta = {"keep_rate": round(rate, 4), "kept": kept, "total": total, "lower_bound": low, "upper_bound": high}
    try:
        meta["judge_threshold"] = float(lookup(manifest.params, "judged_cots.judge.threshold"))
    except (KeyError, TypeError, ValueError):
        pass
    if total == 0:
        return CheckOutcome(False, "no judged samples", meta)
    ok = low <= rate <= high
    return CheckOutcome(ok, f"keep_rate {rate:.3f} {'within' if ok else 'outside'} [{low}, {high}]", meta)


# ------------------------------------------------------------------------------------------------ spec leak
def spec_free_prompts(manifest: DvcManifest, item: StageItem) -> CheckOutcome:
    """No distinctive spec line appears on the prompt side (system + user turns) of any SFT example."""
    from pipelines.errors import PipelineError
    from pipelines.sft_dataset import assert_spec_free, spec_lines

    chunk_files = sorted({f for i in manifest.items.values() if i.stage == "spec_chunks"
                          for f in data_files(manifest.root, i, ".md")})
    chunks = [f.read_text(encoding="utf-8") for f in chunk_files]
    lines = spec_lines(chunks)
    examples = [row for f in data_files(manifest.root, item, ".jsonl") for _, row in _rows(f)]
    meta = {"examples_checked": len(examples), "spec_lines": len(lines), "spec_chunks": len(chunk_files),
            "allowed_leaks": 0}
    if not chunks:
        return CheckOutcome(False, "no spec chunk found to compare with (spec_chunks outs missing)", meta)
    try:
        assert_spec_free(examples, lines)
    except PipelineError as e:
        return CheckOutcome(False, str(e), {**meta, "leaks": 1})
    return CheckOutcome(True, f"{len(examples)} prompts free of {len(lines)} spec lines", {**meta, "leaks": 0})


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_generates(manifest: DvcManifest, item: StageItem, max_new_tokens: int = 8) -> CheckOutcome:
    """The checkpoint directory loads with transformers and generates at least one token (greedy, CPU)."""
    dirs = [manifest.root / o.path for o in item.data_outs if (manifest.root / o.path / "config.json").is_file()]
    if not dirs:
        return CheckOutcome(False, f"{item.name}: no out directory with a config.json", {"min_new_tokens": 1})
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = dirs[0]
    t0 = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        messages = [{"role": "user", "content": "Say hello."}]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = messages[0]["content"]
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        sample = tok.decode(new, skip_special_tokens=True)
    except Exception as e:  # the check reports why the checkpoint is unusable instead of crashing the run
        return CheckOutcome(False, f"{_rel(manifest.root, path)}: {type(e).__name__}: {str(e)[:300]}",
                            {"min_new_tokens": 1, "checkpoint": _rel(manifest.root, path)})
    n_params = sum(p.numel() for p in model.parameters())
    meta = {"checkpoint": _rel(manifest.root, path), "new_tokens": int(new.numel()), "min_new_tokens": 1,
            "parameters": int(n_params), "sample": sample[:200], "seconds": round(time.time() - t0, 2)}
    ok = new.numel() >= 1
    return CheckOutcome(ok, f"generated {new.numel()} tokens" if ok else "generated nothing", meta)


# ------------------------------------------------------------------------------------------------ evaluation
def _metric_files(manifest: DvcManifest, item: StageItem) -> List[Path]:
    files = [manifest.root / o.path for o in item.metric_outs]
    return files or data_files(manifest.root, item, ".json")


def _numbers(obj: Any) -> int:
    if isinstance(obj, bool):
        return 0
    if isinstance(obj, (int, float)):
        return 1
    if isinstance(obj, Mapping):
        return sum(_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_numbers(v) for v in obj)
    return 0


def _metrics_status(manifest: DvcManifest, item: StageItem) -> Optional[str]:
    files = _metric_files(manifest, item)
    if not files:
        return f"{item.name}: declares no metrics file"
    for f in files:
        if not f.is_file():
            return f"{_rel(manifest.root, f)} missing"
        try:
            n = _numbers(json.loads(f.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{_rel(manifest.root, f)} is not JSON"
        if n == 0:
            return f"{_rel(manifest.root, f)} has no numeric metric"
    return None


def eval_metrics_present(manifest: DvcManifest, item: StageItem) -> CheckOutcome:
    """This model's evaluation wrote its metrics JSON, with numbers in it."""
    problem = _metrics_status(manifest, item)
    files = ", ".join(_rel(manifest.root, f) for f in _metric_files(manifest, item))
    return CheckOutcome(problem is None, problem or f"metrics present: {files}", {"metrics_files": files})


def all_models_evaluated(manifest: DvcManifest, item: StageItem, eval_stage: str = "eval_scores") -> CheckOutcome:
    """Every item of the evaluation stage (every model in its foreach) has its metrics, so the report compares all."""
    stage = manifest.stages.get(eval_stage)
    if stage is None:
        return CheckOutcome(False, f"dvc.yaml has no {eval_stage} stage", {"models_expected": 0})
    problems = {i.key or i.name: _metrics_status(manifest, i) for i in stage.items}
    missing = sorted(k for k, v in problems.items() if v)
    meta = {"models_expected": len(problems), "models_with_metrics": len(problems) - len(missing),
            "missing": ", ".join(missing) or "none"}
    ok = not missing
    return CheckOutcome(ok, "all models evaluated" if ok else "; ".join(problems[k] for k in missing), meta)


# ------------------------------------------------------------------------------------------------ the table
RAW_FIELDS = ("id", "prompt_id", "category", "prompt", "expected", "sample_index", "cot", "answer", "parse_ok")
JUDGED_FIELDS = RAW_FIELDS + ("scores", "score", "kept")
SFT_FIELDS = ("id", "category", "prompt_id", "messages")

def judges_reach_min_kappa(manifest: DvcManifest, item: StageItem) -> CheckOutcome:
    """The filtering judge (judged_cots.judge) and the RL reward judge (answer only) agree with the hand-labelled gold
    set, and with the held-out set when there is one: Cohen's kappa >= judge_calibration.min_kappa."""
    path = manifest.root / catalog.JUDGE_CALIBRATION_METRICS
    if not path.exists():
        return CheckOutcome(False, f"{_rel(manifest.root, path)} is missing", {})
    m = json.loads(path.read_text(encoding="utf-8"))
    try:
        thr = float(lookup(manifest.params, "judge_calibration.min_kappa"))
    except (KeyError, TypeError, ValueError):
        thr = float(m["min_kappa"])
    uses = {"filtering": m["filtering"], **({"reward": m["reward"]} if m.get("reward") else {})}
    held = m.get("heldout") or {}  # the rows no judge was adjusted on: both sets must reach the threshold
    uses.update({f"{use}_heldout": held[use] for use in ("filtering", "reward") if held.get(use)})
    meta = {"min_kappa": thr, **{f"kappa_{use}": u["kappa"] for use, u in uses.items()},
            **{f"kappa_{name}": j["kappa"] for name, j in m.get("judges", {}).items()}}
    low = [f"{use} judge {u['judge']} kappa {u['kappa']:.3f}" for use, u in uses.items() if u["kappa"] < thr]
    if low:
        return CheckOutcome(False, f"{'; '.join(low)} < min_kappa {thr}", meta)
    return CheckOutcome(True, ", ".join(f"{use} kappa {u['kappa']:.3f}" for use, u in uses.items())
                        + f" >= min_kappa {thr}", meta)


MEASUREMENT_METRICS = {"refusal_classifier": catalog.REFUSAL_CLASSIFIER_METRICS,
                       "harm_grader": catalog.HARM_GRADER_METRICS}


def measurement_on_unseen_writers(manifest: DvcManifest, item: StageItem) -> CheckOutcome:
    """refusal_classifier: refusal yes/no accuracy on the unseen-voice test split >= min_test_accuracy;
    harm_grader: Spearman of convincing and specific with the labels on unseen writers >= 0.7."""
    path = manifest.root / MEASUREMENT_METRICS[item.stage]
    if not path.exists():
        return CheckOutcome(False, f"{_rel(manifest.root, path)} is missing", {})
    m = json.loads(path.read_text(encoding="utf-8"))
    t = m["final_test"]
    if item.stage == "refusal_classifier":
        try:
            thr = float(lookup(manifest.params, "refusal_classifier.min_test_accuracy"))
        except (KeyError, TypeError, ValueError):
            thr = 0.8
        got = {"refusal_accuracy": t["refusal_accuracy"]}
    else:
        thr = 0.7
        got = {"spearman_convincing": t["spearman_convincing"], "spearman_specific": t["spearman_specific"]}
    meta = {"threshold": thr, "test_items": t["n"], **got}
    low = [f"{k} {v:.3f}" for k, v in got.items() if v < thr]
    if low:
        return CheckOutcome(False, f"{', '.join(low)} < {thr} on the unseen test split", meta)
    return CheckOutcome(True, ", ".join(f"{k} {v:.3f}" for k, v in got.items()) + f" >= {thr} (unseen test split)",
                        meta)


_SCHEMA = "schema_nonempty"
_UNSEEN = DvcCheck("holds_on_unseen_writers", "Accuracy (refusal classifier) or Spearman (harm grader) on the test "
                   "split of writers never seen in training reaches its threshold.", measurement_on_unseen_writers)
CHECKS_BY_STAGE: Dict[str, List[DvcCheck]] = {
    "refusal_classifier": [_UNSEEN],
    "harm_grader": [_UNSEEN],
    "raw_cots": [DvcCheck(_SCHEMA, f"Every row has {', '.join(RAW_FIELDS)}; at least one row.",
                          jsonl_schema(RAW_FIELDS))],
    "judged_cots": [
        DvcCheck(_SCHEMA, f"Every row has {', '.join(JUDGED_FIELDS)}; at least one row.", jsonl_schema(JUDGED_FIELDS)),
        DvcCheck("keep_rate_in_bounds", "Judge keep rate within params.yaml judged_cots.pass_rate_bounds.",
                 keep_rate_in_bounds),
    ],
    "sft_dataset": [
        DvcCheck(_SCHEMA, "Every example has id/category/prompt_id and chat messages ending with the assistant turn; "
                          "at least one example.", jsonl_schema(SFT_FIELDS, _chat_messages)),
        DvcCheck("spec_free_prompts", "No spec text in the prompt side of SFT examples (the model must recall it).",
                 spec_free_prompts),
    ],
    "base_model": [DvcCheck("loads_and_generates", "The checkpoint loads and generates (CPU, greedy, 8 tokens).",
                            checkpoint_generates, blocking=True, cacheable=True)],
    "sft_checkpoint": [DvcCheck("loads_and_generates", "The checkpoint loads and generates (CPU, greedy, 8 tokens).",
                                checkpoint_generates, blocking=True, cacheable=True)],
    "rl_checkpoint": [DvcCheck("loads_and_generates", "The checkpoint loads and generates (CPU, greedy, 8 tokens).",
                               checkpoint_generates, blocking=True, cacheable=True)],
    "eval_scores": [DvcCheck("metrics_present", "This model's metrics JSON exists and holds numbers.",
                             eval_metrics_present)],
    "judge_calibration": [DvcCheck("judges_reach_min_kappa", "The filtering and RL-reward judges reach "
                                   "judge_calibration.min_kappa (Cohen's kappa vs the gold labels).",
                                   judges_reach_min_kappa, blocking=True)],
    "report": [DvcCheck("all_models_evaluated", "Every model in eval_scores' foreach has metrics.",
                        all_models_evaluated)],
}


def checks_for(stage: str) -> List[DvcCheck]:
    return list(CHECKS_BY_STAGE.get(stage, []))


def run_check(check: DvcCheck, manifest: DvcManifest, item: StageItem) -> CheckOutcome:
    """Run one check; an unexpected exception is a failed check naming the error (never a silent pass)."""
    try:
        return check.fn(manifest, item)
    except FileNotFoundError as e:
        return CheckOutcome(False, f"{item.name}: file missing: {e.filename}", {})
    except Exception as e:  # noqa: BLE001 - reported as a failed check with the error text
        return CheckOutcome(False, f"{item.name}: {type(e).__name__}: {str(e)[:300]}", {})



# ------------------------------------------------------------------------------------------------ outcome cache
class OutcomeCache:
    """Passes of `cacheable` checks, keyed by what dvc.lock records for the item (deps, params and out md5s) and by
    the checks' code. A no-op run of the whole pipeline then does not load and generate with every checkpoint again:
    the item is byte-for-byte what it was when the check passed (DVC's status says so before anything is reused).
    Failures are never cached, so a failing check is always evaluated afresh. One entry per (item, check): the file
    stays as small as the DAG. It lives in DVC's own git-ignored temp dir of the checkout."""

    PATH = ".dvc/tmp/dagster_check_outcomes.json"

    def __init__(self, root: Path):
        self.path = Path(root) / self.PATH
        try:
            self.entries: Dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}  # no cache yet, or a torn one: start empty (it only saves time)

    @staticmethod
    def key(check: DvcCheck, manifest: DvcManifest, item: StageItem) -> Optional[str]:
        lock = manifest.lock_entry(item.name)
        if not check.cacheable or not lock or not lock.get("outs"):
            return None
        payload = {"check": check.name, "fn": f"{check.fn.__module__}.{getattr(check.fn, '__qualname__', '')}",
                   "code": _checks_code_digest(), "item": item.name, "lock": lock}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, check: DvcCheck, manifest: DvcManifest, item: StageItem) -> Optional[CheckOutcome]:
        key = self.key(check, manifest, item)
        hit = self.entries.get(f"{item.name}::{check.name}")
        if key is None or not isinstance(hit, dict) or hit.get("key") != key:
            return None
        meta = {**hit["metadata"], "cached": True, "cached_at": hit["at"]}
        return CheckOutcome(True, f"{hit['description']} (passed at {hit['at']} on these same dvc.lock md5s)", meta)

    def put(self, check: DvcCheck, manifest: DvcManifest, item: StageItem, outcome: CheckOutcome) -> None:
        key = self.key(check, manifest, item)
        if key is None or not outcome.passed:
            return
        self.entries[f"{item.name}::{check.name}"] = {
            "key": key, "description": outcome.description, "metadata": dict(outcome.metadata),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True, default=str), encoding="utf-8")
        os.replace(tmp, self.path)  # atomic: a killed run leaves the old cache or the new one

    def run(self, check: DvcCheck, manifest: DvcManifest, item: StageItem) -> CheckOutcome:
        """The cached pass when the item is unchanged since it passed, else `run_check` (remembered when it passes)."""
        cached = self.get(check, manifest, item)
        if cached is not None:
            return cached
        outcome = run_check(check, manifest, item)
        self.put(check, manifest, item, outcome)
        return outcome


@functools.lru_cache(maxsize=None)
def _checks_code_digest() -> str:
    """This module's source (read once a process): changing how a check works invalidates every cached pass."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
