"""`python -m dagster_project {plan,audit}`: look at the DVC pipeline the way Dagster sees it, without running it.

    python -m dagster_project plan            # what would rerun and why (dvc status + downstream walk)
    python -m dagster_project plan --json
    python -m dagster_project audit           # outs vs dvc.lock, git, params, Dagster versions, environment
    python -m dagster_project audit --json --dagster-home dagster_home
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
    sub = p.add_subparsers(dest="command", required=True, metavar="{plan,audit}")

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
                    "skipped otherwise); package versions and seeds in training_summary.json vs this environment "
                    "(major/minor drift fails, patch drift warns).")
    au.add_argument("--json", action="store_true", help="Print the result as JSON.")
    au.add_argument("--dagster-home", default=None,
                    help="Dagster instance directory (default: $DAGSTER_HOME). Without one, Dagster rows are SKIP.")
    au.add_argument("--no-dagster", action="store_true", help="Do not read any Dagster instance.")
    au.add_argument("--rehash", action="store_true",
                    help="Also hash every out from its bytes (slower): DVC's own check trusts inode, mtime and size, "
                         "so an edit that restores them passes it.")
    return p


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
        from .audit import audit, format_audit

        result = audit(root, dagster_home=args.dagster_home, use_dagster=not args.no_dagster,
                       rehash=args.rehash)
        print(json.dumps(result, indent=2) if args.json else format_audit(result))
        return 0 if result["ok"] else 1
    except (ManifestError, DvcCommandError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    sys.exit(main())
