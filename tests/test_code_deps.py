"""Honest code deps: every dvc.yaml stage depends on every project file its command imports, transitively.

DVC cannot see Python imports. A stage that imports pipelines/io.py without listing it would not rerun when io.py
changes: `dvc status` says up to date and audit passes on outputs the current code would not produce. This walks the
imports statically (every `import` / `from ... import`, also those inside functions) from the module a stage's
command runs, and requires a dep that covers each file (the file itself or a directory above it).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import yaml

from conftest import ROOT

STAGE_CMD = re.compile(r"python -m (pipelines)\s+(\w+)")


def module_file(root: Path, dotted: str) -> Path | None:
    base = root / dotted.replace(".", "/")
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imported_modules(root: Path, path: Path) -> Set[str]:
    """Dotted names a file imports (absolute or relative), with `from x import y` also tried as module x.y."""
    package = path.relative_to(root).with_suffix("").parts[:-1] if path.name != "__init__.py" else \
        path.relative_to(root).parts[:-1]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = list(package[: len(package) - node.level + 1])
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def project_closure(root: Path, entry: Path) -> Set[Path]:
    """Every project file reachable by imports from `entry`, with each package's __init__.py on the way."""
    seen: Set[Path] = set()
    todo = [entry]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in imported_modules(root, f):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                m = module_file(root, ".".join(parts[:i]))
                if m is not None and m not in seen:
                    todo.append(m)
    return seen


def stage_entries(root: Path) -> Dict[str, List[Path]]:
    """dvc.yaml stage -> the files its command runs: `python -m pipelines X` runs pipelines/__main__.py (the CLI)
    and pipelines/X.py (imported by name, invisible to a static walk)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        body = st.get("do", st)
        m = STAGE_CMD.search(str(body.get("cmd", "")))
        if m:
            out[name] = [root / "pipelines/__main__.py", module_file(root, f"pipelines.{m.group(2)}")]
    return out


def undeclared(root: Path) -> Dict[str, List[str]]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, entries in stage_entries(root).items():
        deps = [str(d).rstrip("/") for d in stages[name].get("do", stages[name]).get("deps", [])]
        files = set().union(*(project_closure(root, e) for e in entries))
        lack = sorted(p for p in (f.relative_to(root).as_posix() for f in files)
                      if not any(p == d or p.startswith(d + "/") for d in deps))
        if lack:
            missing[name] = lack
    return missing


def test_every_stage_depends_on_every_project_file_it_imports():
    missing = undeclared(ROOT)
    assert not missing, "dvc.yaml stages import files they do not list as deps:\n" + "\n".join(
        f"  {s}: {', '.join(fs)}" for s, fs in missing.items())


def test_the_walk_sees_relative_lazy_and_package_imports(tmp_path):
    """The rule can fail: a stage that imports a helper (lazily, relatively, through a package) without listing it."""
    pkg = tmp_path / "pipelines"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("from .cli import app\n")
    (pkg / "cli.py").write_text("import importlib\n")
    (pkg / "sub/__init__.py").write_text("from .deep import X\n")
    (pkg / "sub/deep.py").write_text("X = 1\n")
    (pkg / "helper.py").write_text("from .sub import X\n")
    (pkg / "train.py").write_text("def main():\n    from . import helper\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "python -m pipelines train", "deps": ["pipelines/train.py", "pipelines/__main__.py",
                                                     "pipelines/cli.py", "pipelines/__init__.py"]}}}))
    assert undeclared(tmp_path) == {"train": ["pipelines/helper.py", "pipelines/sub/__init__.py",
                                              "pipelines/sub/deep.py"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "python -m pipelines train", "deps": ["pipelines"]}}}))  # a directory dep covers what is under it
    assert undeclared(tmp_path) == {}
