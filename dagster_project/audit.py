"""`python -m dagster_project audit`: is what is on disk exactly what dvc.lock, git and Dagster say was produced?

Rows (PASS / FAIL / WARN / SKIP); any FAIL makes the exit code 1:
- git: the work tree is clean (nothing modified or untracked outside .gitignore) and HEAD is a commit;
- outs: every out in dvc.lock is present and has the recorded md5 (DVC's own hashing, through `dvc status`, so
  directory `.dir` hashes match exactly); each missing or edited file is its own FAIL row naming it;
- up to date: no stage has changed deps, params or command since dvc.lock (else outputs are not reproducible from HEAD);
- params: the values recorded in dvc.lock equal params.yaml's;
- dagster: the latest materialization of every asset partition carries dvc.lock's data version, and the latest asset
  check results passed (needs a DAGSTER_HOME instance; SKIP otherwise);
- environment: package versions and seeds in training_summary.json files vs this environment and params.yaml
  (a major/minor difference FAILs, a patch difference WARNs);
- environment lock: every package pinned in requirements/cpu.lock (+ nodeps.lock) vs the installed version, by the
  same rule (SKIP without a lock file, or with --no-lock for a GPU install made with `make setup LOCK=`);
- bit-identical reruns: stages whose params take them off the deterministic path (a GPU, multi-process training, a
  generator or judge on an HTTP server) are named in a WARN row: a rerun of them may record other md5s
  (RELIABILITY.md, "Bit-identical reruns").
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

from .dvc_cli import dvc_json
from .manifest import DvcManifest, dep_matches_out, lookup
from .plan import check_item_keys
from .versions import data_version

PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
SUMMARY_FILE = "training_summary.json"
LOCK_FILES = ("requirements/cpu.lock", "requirements/nodeps.lock")  # what `make setup` installs, hash-checked


@dataclass
class Row:
    status: str
    check: str
    detail: str


# ------------------------------------------------------------------------------------------------ git
def audit_git(root: Path) -> Tuple[List[Row], Optional[str]]:
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return [Row(FAIL, "git commit", f"no commit at HEAD in {root} ({head.stderr.strip()[:200]})")], None
    sha = head.stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    if dirty:
        shown = ", ".join(ln[3:] for ln in dirty[:8]) + (f" (+{len(dirty) - 8} more)" if len(dirty) > 8 else "")
        return [Row(FAIL, "git tree clean", f"{len(dirty)} uncommitted path(s) at {sha[:12]}: {shown}")], sha
    return [Row(PASS, "git tree clean", f"commit {sha}")], sha


# ------------------------------------------------------------------------------------------------ dvc
def audit_dvc(manifest: DvcManifest, status: Dict[str, List[Any]]) -> List[Row]:
    rows: List[Row] = []
    never = [n for n in manifest.topological_order() if manifest.lock_entry(n) is None]
    for n in never:
        rows.append(Row(FAIL, f"stage {n}", "not in dvc.lock (never reproduced)"))
    bad_outs: List[str] = []
    for name, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict) and name not in never:
                for path, st in (entry.get("changed outs") or {}).items():
                    bad_outs.append(path)
                    why = ("content differs from the md5 in dvc.lock" if st == "modified" else
                           "missing" if st in ("deleted", "not in cache") else st)
                    rows.append(Row(FAIL, f"out {path}", f"{why} ({name})"))
    stale: List[str] = []
    for name, entries in status.items():
        if name in never:
            continue
        for entry in entries:
            if isinstance(entry, str):
                stale.append(f"{name}: {entry}")
                continue
            # a dep that is a failing out of another item is already reported above
            deps = {p: s for p, s in (entry.get("changed deps") or {}).items()
                    if not any(dep_matches_out(p, b) for b in bad_outs)}
            if deps:
                stale.append(f"{name}: " + ", ".join(
                    f"{p} ({', '.join(f'{k} {v}' for k, v in s.items()) if isinstance(s, dict) else s})"
                    for p, s in deps.items()))
    n_outs = sum(len(manifest.lock_outs(n)) for n in manifest.items if manifest.lock_entry(n) is not None)
    if not bad_outs:
        rows.append(Row(PASS, "outs match dvc.lock", f"{n_outs} outs of {len(manifest.items) - len(never)} items "
                                                     "present with the recorded md5"))
    if stale:
        rows.append(Row(FAIL, "stages up to date", "; ".join(stale)[:1500]))
    elif not never:
        rows.append(Row(PASS, "stages up to date", "no changed deps, params or commands (dvc status)"))
    return rows


_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def _as_number(v: Any) -> Optional[float]:
    """A number, or a string that is one: YAML 1.1 (PyYAML, what DVC wrote into dvc.lock) reads `5e-05` as the string
    '5e-05' while params.yaml's `5.0e-05` is a float; both mean the same learning rate."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        return float(v)
    return None


def first_difference(current: Any, recorded: Any, key: str) -> Optional[Tuple[str, Any, Any]]:
    """(dotted key, current, recorded) of the first value that differs, comparing by value: numbers as numbers
    (1 == 1.0, '5e-05' == 5.0e-05), mappings key by key, lists item by item; None when they agree."""
    if isinstance(current, dict) and isinstance(recorded, dict):
        for k in sorted(set(current) | set(recorded), key=str):
            if k not in current or k not in recorded:
                return f"{key}.{k}", current.get(k, "<missing>"), recorded.get(k, "<missing>")
            diff = first_difference(current[k], recorded[k], f"{key}.{k}")
            if diff:
                return diff
        return None
    if isinstance(current, list) and isinstance(recorded, list):
        if len(current) != len(recorded):
            return key, current, recorded
        for i, (a, b) in enumerate(zip(current, recorded)):
            diff = first_difference(a, b, f"{key}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(current, bool) != isinstance(recorded, bool):  # True == 1 in Python, not in a params file
        return key, current, recorded
    a, b = _as_number(current), _as_number(recorded)
    if a is not None and b is not None:
        return None if a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b)) else (key, current, recorded)
    return None if current == recorded else (key, current, recorded)


def audit_params(manifest: DvcManifest) -> List[Row]:
    mismatches: List[str] = []
    compared = 0
    for name in manifest.items:
        for file, values in manifest.lock_params(name).items():
            data = manifest.params_files.get(file)
            if data is None:  # a params file dvc.lock records but no stage declares any more
                p = manifest.root / file
                data = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}) if p.is_file() else {}
            for key, recorded in values.items():
                compared += 1
                try:
                    current = lookup(data, key)
                except KeyError:
                    mismatches.append(f"{name}: {file}:{key} missing (dvc.lock has {_short(recorded)})")
                    continue
                diff = first_difference(current, recorded, key)
                if diff:
                    where, now, then = diff
                    mismatches.append(f"{name}: {file}:{where} is {_short(now)}, dvc.lock has {_short(then)}")
    if mismatches:
        # the first mismatch in full (it names the key and both values), then a count of the rest
        more = f" (+{len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        return [Row(FAIL, "params match dvc.lock", mismatches[0] + more)]
    return [Row(PASS, "params match dvc.lock", f"{compared} recorded param values equal params.yaml (by value)")]


def dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records for an out, computed from the bytes (pipelines.model_card.dvc_md5: one implementation of
    DVC's file and directory digests for the cards, the input assets and this audit)."""
    from pipelines.model_card import dvc_md5 as digest

    return digest(path)


def audit_rehash(manifest: DvcManifest) -> List[Row]:
    """Every out's md5 recomputed from its bytes, not taken from DVC's state cache (which trusts inode, mtime and
    size, so an edit that restores both passes `dvc status`)."""
    rows: List[Row] = []
    checked = 0
    for name in manifest.items:
        for out, md5 in manifest.lock_outs(name).items():
            path = manifest.root / out
            if not md5 or not path.exists():
                continue  # missing outs are reported by the DVC rows
            checked += 1
            got = dvc_md5(path)
            if got != md5:
                rows.append(Row(FAIL, f"out {out} (rehash)", f"bytes hash to {got}, dvc.lock has {md5} ({name})"))
    if not rows:
        rows.append(Row(PASS, "outs rehashed", f"{checked} outs hashed from their bytes match dvc.lock"))
    return rows


def lock_out_md5s(lock_file: Path) -> Dict[Tuple[str, str], Optional[str]]:
    """{(stage item, out path): md5} of every out recorded in a dvc.lock."""
    stages = (yaml.safe_load(Path(lock_file).read_text(encoding="utf-8")) or {}).get("stages") or {}
    return {(name, o["path"]): o.get("md5") for name, s in stages.items() for o in s.get("outs") or []}


def differing_outs(one: Mapping[Tuple[str, str], Optional[str]],
                   two: Mapping[Tuple[str, str], Optional[str]]) -> List[str]:
    """`item: path (md5 one != md5 two)` for every out whose md5 differs between two dvc.lock files, or that only
    one of them records; sorted. Two runs of one commit on the same inputs should give none (bit-identical reruns)."""
    return [f"{name}: {path} ({one.get((name, path))} != {two.get((name, path))})"
            for name, path in sorted(set(one) | set(two)) if one.get((name, path)) != two.get((name, path))]


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


# ------------------------------------------------------------------------------------------------ dagster
def find_instance_dir(dagster_home: Optional[str]) -> Optional[Path]:
    home = dagster_home or os.environ.get("DAGSTER_HOME")
    if not home:
        return None
    p = Path(home)
    return p if p.is_dir() and (any(p.glob("dagster.yaml")) or (p / "storage").exists() or (p / "history").exists()) \
        else None


def audit_dagster(manifest: DvcManifest, home: Optional[Path]) -> List[Row]:
    if home is None:
        return [Row(SKIP, "dagster data versions", "no Dagster instance (set DAGSTER_HOME or --dagster-home)"),
                Row(SKIP, "dagster asset checks", "no Dagster instance")]
    import dagster as dg

    from .translator import DagsterDvcTranslator

    translator = DagsterDvcTranslator()
    instance = dg.DagsterInstance.from_config(str(home))
    rows: List[Row] = []
    try:
        mismatched, missing, matched = [], [], 0
        for name in manifest.topological_order():
            item = manifest.items[name]
            expected = data_version(manifest, name)
            if expected is None:
                continue
            key = translator.get_asset_key(manifest.stages[item.stage])
            flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[item.key] if item.key is not None else None)
            records = instance.fetch_materializations(flt, limit=1).records
            if not records:
                missing.append(name)
                continue
            mat = records[0].asset_materialization
            got = (mat.tags or {}).get("dagster/data_version") if mat is not None else None
            if got != expected:
                mismatched.append(f"{name}: Dagster {got}, dvc.lock {expected}")
            else:
                matched += 1
        if mismatched:
            rows.append(Row(FAIL, "dagster data versions", "; ".join(mismatched)[:1500]))
        elif matched:
            rows.append(Row(PASS, "dagster data versions", f"{matched} latest materializations carry dvc.lock's md5"))
        if missing:
            rows.append(Row(WARN if matched or mismatched else SKIP, "dagster data versions",
                            f"never materialized through Dagster: {', '.join(missing[:10])}"
                            + (f" (+{len(missing) - 10})" if len(missing) > 10 else "")))
        rows.extend(_audit_checks(manifest, translator, instance))
    finally:
        instance.dispose()
    return rows


def _audit_checks(manifest: DvcManifest, translator: Any, instance: Any) -> List[Row]:
    import dagster as dg

    failed, passed, unseen = [], 0, 0
    for stage_name, stage in manifest.stages.items():
        key = translator.get_asset_key(stage)
        for check in translator.get_checks(stage):
            ck = dg.AssetCheckKey(key, check.name)
            history = instance.event_log_storage.get_asset_check_execution_history(ck, limit=500)
            latest: Dict[Optional[str], Any] = {}
            for rec in history:  # newest first
                latest.setdefault(rec.partition, rec)
            for item in stage.items:
                rec = latest.get(item.key)
                evaluation = rec.event.asset_check_evaluation if rec is not None and rec.event is not None else None
                if evaluation is None:
                    unseen += 1
                elif evaluation.passed:
                    passed += 1
                else:
                    failed.append(f"{item.name}:{check.name} ({evaluation.description or 'failed'})")
    rows = []
    if failed:
        rows.append(Row(FAIL, "dagster asset checks", "; ".join(failed)[:1500]))
    elif passed:
        rows.append(Row(PASS, "dagster asset checks", f"{passed} latest check results passed"))
    if unseen:
        rows.append(Row(WARN if passed or failed else SKIP, "dagster asset checks",
                        f"{unseen} check/partition pairs never evaluated"))
    return rows


# ------------------------------------------------------------------------------------------------ environment
def _env_version(name: str) -> Optional[str]:
    if name == "python":
        return platform.python_version()
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def _release(v: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _drift(pkg: str, wanted: str, current: Optional[str]) -> Tuple[Optional[str], str]:
    """(FAIL/WARN or None when equal, what differs): a major/minor difference or a missing package FAILs, a patch
    or local-build difference (2.13.0+cpu vs 2.13.0+cu128) WARNs."""
    if current is None:
        return FAIL, f"{pkg} {wanted} not installed"
    if current == wanted:
        return None, ""
    status = FAIL if _release(current)[:2] != _release(wanted)[:2] else WARN
    return status, f"{pkg} {wanted} -> {current}" + (" (patch or build)" if status == WARN else "")


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_lock_pins(path: Path) -> Dict[str, str]:
    """{normalised distribution name: version} of the `name==version` lines of a pip requirements/lock file."""
    pins: Dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def audit_lock(root: Path, lock_files: Iterable[str] = LOCK_FILES) -> List[Row]:
    """Installed versions vs the lock files `make setup` installs from: the environment that reproduces the outs."""
    present = [root / f for f in lock_files if (root / f).is_file()]
    if not present:
        return [Row(SKIP, "environment lock", f"no {' / '.join(lock_files)} in {root}")]
    pins: Dict[str, str] = {}
    for f in present:
        pins.update(read_lock_pins(f))
    fails, warns = [], []
    for pkg, wanted in sorted(pins.items()):
        status, what = _drift(pkg, wanted, _env_version(pkg))
        (fails if status == FAIL else warns if status == WARN else []).append(what)
    names = ", ".join(f.relative_to(root).as_posix() for f in present)
    if not fails and not warns:
        return [Row(PASS, "environment lock", f"{len(pins)} installed versions match {names}")]
    shown = fails + warns
    detail = "; ".join(shown[:8]) + (f" (+{len(shown) - 8} more)" if len(shown) > 8 else "")
    return [Row(FAIL if fails else WARN, "environment lock",
                f"{len(shown)} of {len(pins)} differ from {names}: {detail}. Reinstall with `make setup` (a GPU "
                "install made with `make setup LOCK=` differs on purpose: audit --no-lock)")]


def nondeterministic_settings(value: Any, key: str = "") -> Iterable[str]:
    """`key: why` for every setting in a params value that takes a stage off the deterministic path (what DVC
    records for it may change on a rerun): an HTTP backend, a device other than the CPU, a multi-process launcher."""
    if isinstance(value, dict):
        dot = f"{key}." if key else ""
        if value.get("kind") == "openai":
            yield f"{key or 'params'}: an HTTP server generates (its batching and sampling are outside this run)"
        if value.get("device") not in (None, "cpu"):
            yield f"{dot}device {value['device']}: GPU kernels are not bitwise repeatable"
        if value.get("launcher") not in (None, "python"):
            yield f"{dot}launcher {value['launcher']}: several processes reduce gradients in varying order"
        for k, v in value.items():
            yield from nondeterministic_settings(v, f"{dot}{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from nondeterministic_settings(v, f"{key}[{i}]")


def audit_determinism(manifest: DvcManifest) -> List[Row]:
    """Stages whose declared params make a rerun's outs differ from dvc.lock's even with the same code and inputs."""
    found: Dict[str, List[str]] = {}
    for name in manifest.stages:
        for ref_key, value in manifest.param_values(name).items():
            key = ref_key.split(":", 1)[1]
            for why in nondeterministic_settings(value, "" if key == "*" else key):
                if why not in found.setdefault(name, []):
                    found[name].append(why)
    if not found:
        return [Row(PASS, "bit-identical reruns", f"none of the {len(manifest.stages)} stages uses a GPU, several "
                                                  "processes or an HTTP generator or judge: a rerun on this machine "
                                                  "records the same md5s")]
    detail = "; ".join(f"{n} ({', '.join(w)})" for n, w in found.items())
    return [Row(WARN, "bit-identical reruns", f"a rerun may record other md5s for: {detail}"[:1500])]


def audit_environment(manifest: DvcManifest) -> List[Row]:
    summaries: List[Tuple[str, Path]] = []
    for name in manifest.topological_order():
        for out in manifest.items[name].data_outs:
            p = manifest.root / out.path
            if p.is_dir() and (p / SUMMARY_FILE).is_file():
                summaries.append((name, p / SUMMARY_FILE))
    if not summaries:
        return [Row(SKIP, "training environment", f"no {SUMMARY_FILE} in any out (no training stage has run)")]
    rows: List[Row] = []
    for name, path in summaries:
        rel = path.relative_to(manifest.root).as_posix()
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            rows.append(Row(FAIL, f"training environment {name}", f"{rel}: unreadable ({e})"))
            continue
        fails, warns, same = [], [], 0
        for pkg, recorded in sorted((summary.get("packages") or {}).items()):
            status, what = _drift(pkg, str(recorded), _env_version(pkg))
            if status is None:
                same += 1
            else:
                (fails if status == FAIL else warns).append(what)
        if "packages" not in summary:
            warns.append("no package versions recorded")
        status = FAIL if fails else WARN if warns else PASS
        rows.append(Row(status, f"packages {name}", "; ".join(fails + warns) or f"{same} package versions match ({rel})"))
        seed = summary.get("seed")
        try:
            configured = lookup(manifest.params, f"{manifest.items[name].stage}.seed")
        except KeyError:
            configured = None
        if seed is None:
            rows.append(Row(WARN, f"seed {name}", f"{rel} records no seed"))
        elif configured is not None and configured != seed:
            rows.append(Row(FAIL, f"seed {name}", f"trained with seed {seed}, params.yaml has {configured}"))
        else:
            rows.append(Row(PASS, f"seed {name}", f"seed {seed} recorded" + (" = params.yaml" if configured is not None else "")))
    return rows


# ------------------------------------------------------------------------------------------------ all
def audit(root: str | Path, dagster_home: Optional[str] = None, use_dagster: bool = True,
          rehash: bool = False, use_lock: bool = True) -> Dict[str, Any]:
    manifest = DvcManifest.load(root)
    check_item_keys(manifest)
    git_rows, sha = audit_git(manifest.root)
    status = dvc_json(["status"], manifest.root)
    rows = git_rows + audit_dvc(manifest, dict(status or {})) + audit_params(manifest)  # type: ignore[arg-type]
    if rehash:
        rows += audit_rehash(manifest)
    if use_dagster:
        rows += audit_dagster(manifest, find_instance_dir(dagster_home))
    else:
        rows.append(Row(SKIP, "dagster", "--no-dagster"))
    rows += audit_environment(manifest)
    rows += audit_lock(manifest.root) if use_lock else [Row(SKIP, "environment lock", "--no-lock")]
    rows += audit_determinism(manifest)
    return {"ok": not any(r.status == FAIL for r in rows), "commit": sha, "project_dir": str(manifest.root),
            "rows": [asdict(r) for r in rows]}


def format_audit(result: Dict[str, Any]) -> str:
    rows = result["rows"]
    width = max(len(r["check"]) for r in rows)
    lines = [f"{'':4}  {'CHECK':<{width}}  DETAIL"] + [f"{r['status']:<4}  {r['check']:<{width}}  {r['detail']}"
                                                      for r in rows]
    fails = sum(r["status"] == FAIL for r in rows)
    lines.append("audit passed" if result["ok"] else f"audit FAILED: {fails} failing check(s)")
    return "\n".join(lines)


def failing(result: Dict[str, Any]) -> Iterable[Dict[str, str]]:
    return [r for r in result["rows"] if r["status"] == FAIL]
