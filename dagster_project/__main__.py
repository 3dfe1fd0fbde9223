"""`python -m dagster_project {plan,audit,sync}`: look at the DVC pipeline the way Dagster sees it, without running it.

    python -m dagster_project plan            # what would rerun and why (dvc status + downstream walk)
    python -m dagster_project plan --json
    python -m dagster_project audit           # outs vs dvc.lock, git, params, Dagster versions, environment
    python -m dagster_project audit --json --dagster-home dagster_home
    DAGSTER_HOME=dagster_home python -m dagster_project sync   # record DVC's runs + the inputs' md5s in Dagster
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .dvc_cli import DvcCommandError
from .manifest import ManifestError


def _default_root() -> Path:
    cwd = Path.cwd()
    return cwd if (cwd / "dvc.yaml").is_file() else Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dagster_project",
        description="Inspect the DVC pipeline behind the Dagster assets. Nothing here runs a stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start the UI with `dg dev` (see README); materialize assets there or with `dg launch`.",
    )
    p.add_argument("--project-dir", type=Path, default=None,
                   help="DVC project root (default: the current directory if it has dvc.yaml, else this checkout).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{plan,audit,sync}")

    pl = sub.add_parser(
        "plan", help="List the stage items / asset partitions that would rerun, and why.",
        description="Read `dvc status --json`, classify each changed item's reasons (never run, missing or modified "
                    "out, changed command / param / code / file), then add every downstream item (`upstream "
                    "changed`) along the out->dep graph. Exit code 0 either way; use --json for tools.")
    pl.add_argument("--json", action="store_true", help="Print a JSON list instead of a table.")

    au = sub.add_parser(
        "audit", help="Check that outputs, dvc.lock, git, params and Dagster's records agree. Exit 1 on any FAIL.",
        description="Rows: git tree clean + commit; every out present with dvc.lock's md5 (DVC's hashing, so a "
                    "tampered or missing file fails by name); stages up to date; params in dvc.lock == params.yaml; "
                    "Dagster's latest data versions == dvc.lock and latest asset checks passed (needs DAGSTER_HOME; "
                    "skipped otherwise); package versions and seeds in training_summary.json, and installed "
                    "versions vs requirements/cpu.lock (major/minor drift fails, patch drift warns); stages whose "
                    "params make reruns not bit-identical (GPU, several processes, HTTP backends) warn.")
    au.add_argument("--json", action="store_true", help="Print the result as JSON.")
    au.add_argument("--dagster-home", default=None,
                    help="Dagster instance directory (default: $DAGSTER_HOME). Without one, Dagster rows are SKIP.")
    au.add_argument("--no-dagster", action="store_true", help="Do not read any Dagster instance.")
    au.add_argument("--rehash", action="store_true",
                    help="Also hash every out from its bytes (slower): DVC's own check trusts inode, mtime and size, "
                         "so an edit that restores them passes it.")
    au.add_argument("--no-lock", action="store_true",
                    help="Do not compare installed versions with requirements/cpu.lock (an install made with "
                         "`make setup LOCK=`, e.g. on a GPU machine).")

    sy = sub.add_parser(
        "sync", help="Record in Dagster what DVC produced outside it, and the input files' md5s. Runs no stage.",
        description="Observe every input file (data version = its md5), then record each stage item that `dvc status` "
                    "reports unchanged as a materialization of its asset partition, with dvc.lock's data version, the "
                    "code version and metadata of a Dagster run, unless Dagster already has it (a second sync "
                    "records nothing). Items DVC reports changed are listed, not recorded. Then print what Dagster "
                    "finds stale or missing: it should be exactly what `dvc status` reports. `make ui` runs this "
                    "before `dg dev`; the dvc_sync_sensor repeats it whenever dvc.lock changes.")
    sy.add_argument("--dagster-home", default=None, help="Dagster instance directory (default: $DAGSTER_HOME).")
    sy.add_argument("--json", action="store_true", help="Print the result as JSON.")
    return p


def _sync(root: Path, dagster_home: Optional[str], as_json: bool) -> int:
    import dagster as dg

    from .build import build_definitions
    from .manifest import DvcManifest
    from .sync import sync, unsynced
    from .translator import DagsterDvcTranslator

    home = dagster_home or os.environ.get("DAGSTER_HOME")
    if not home or not Path(home).is_dir():
        print(f"error: sync needs an existing Dagster instance directory (--dagster-home or $DAGSTER_HOME; got "
              f"{home!r})", file=sys.stderr)
        return 2
    translator, manifest = DagsterDvcTranslator(), DvcManifest.load(root)
    graph = build_definitions(root, translator=translator, manifest=manifest).resolve_asset_graph()
    with dg.DagsterInstance.from_config(str(Path(home).resolve())) as instance:
        result = sync(instance, root, translator=translator, asset_graph=graph, manifest=manifest)
        stale = unsynced(instance, graph)
    if as_json:
        print(json.dumps({"observed": result.observed, "materialized": result.materialized,
                          "changed": result.changed, "in_dagster": result.in_dagster, "never_run": result.never_run,
                          "unsynced": [{"asset": a, "partition": p, "reasons": r} for (a, p), r in stale.items()]},
                         indent=2))
        return 0
    print(result.summary())
    for (asset, partition), reasons in stale.items():
        print(f"  unsynced in Dagster: {asset}{f'[{partition}]' if partition else ''}: {'; '.join(reasons)}")
    if not stale:
        print("Dagster finds nothing stale or missing.")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    root = (args.project_dir or _default_root()).resolve()
    try:
        if args.command == "plan":
            from .manifest import DvcManifest
            from .plan import format_plan, plan, plan_json

            manifest = DvcManifest.load(root)
            entries = plan(root, manifest=manifest)
            print(json.dumps(plan_json(entries), indent=2) if args.json else format_plan(entries, len(manifest.items)))
            return 0
        if args.command == "sync":
            return _sync(root, args.dagster_home, args.json)
        from .audit import audit, format_audit

        result = audit(root, dagster_home=args.dagster_home, use_dagster=not args.no_dagster,
                       rehash=args.rehash, use_lock=not args.no_lock)
        print(json.dumps(result, indent=2) if args.json else format_audit(result))
        return 0 if result["ok"] else 1
    except (ManifestError, DvcCommandError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    sys.exit(main())
