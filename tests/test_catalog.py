"""pipelines/catalog.py and dvc.yaml name the same paths.

Stages write where the catalog says; DVC caches, versions and pushes what dvc.yaml declares. If the two drift, a stage
writes a file DVC never tracks, or DVC fails after the stage ran ("output does not exist"). So, per stage item, the
outs, metrics and plots that dvc.yaml declares (its foreach keys expanded by DVC itself from params.yaml, through
dagster_project.manifest) must equal `catalog.by_stage(...)`; the top-level `plots:` must name the report's plot files
(or curves inside a stage's plots directory) and every artifact must be a catalog out. The second test shows a
renamed path failing by stage.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Set

import yaml

from conftest import ROOT
from dagster_project.manifest import DvcManifest
from pipelines import catalog

KINDS = ("outs", "metrics", "plots")


def dvc_paths(root: Path) -> Dict[str, Dict[str, Set[str]]]:
    """{stage item: {"outs" (neither metrics nor plots), "metrics", "plots": paths}} as DVC resolves dvc.yaml."""
    items = DvcManifest.load(root).items
    return {name: {"outs": {o.path for o in item.outs if o.is_data},
                   "metrics": {o.path for o in item.outs if o.metric},
                   "plots": {o.path for o in item.outs if o.plot}} for name, item in items.items()}


def top_level_plot_paths(dvc_yaml: Dict[str, Any]) -> List[str]:
    """Files named by dvc.yaml's top-level `plots:`: an entry's `y` mapping of file -> column, else its id."""
    paths = []
    for entry in dvc_yaml.get("plots") or []:
        if isinstance(entry, str):
            paths.append(entry)
            continue
        for plot_id, props in entry.items():
            y = (props or {}).get("y")
            paths.extend(y) if isinstance(y, dict) else paths.append(plot_id)
    return paths


def differences(root: Path) -> List[str]:
    """What dvc.yaml at `root` and the catalog disagree on, one line each naming the stage item (or section) and path."""
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    declared = dvc_paths(root)
    table = catalog.by_stage(params["categories"], list(params["eval_scores"]["models"]))
    problems = []
    for name in sorted(set(declared) | set(table)):
        if name not in table:
            problems.append(f"{name}: a dvc.yaml stage item the catalog has no entry for")
        elif name not in declared:
            problems.append(f"{name}: in the catalog, not a dvc.yaml stage item")
        else:
            for kind in KINDS:
                theirs, ours = declared[name][kind], set(table[name][kind])
                problems += [f"{name}: {kind} {p} is in dvc.yaml only" for p in sorted(theirs - ours)]
                problems += [f"{name}: {kind} {p} is in the catalog only" for p in sorted(ours - theirs)]
    report_files = catalog.report_plots(params["report"]["models"])
    plot_dirs = [d for entry in table.values() for d in entry["plots"]]
    plotted = top_level_plot_paths(dvc_yaml)
    problems += [f"plots: {p} is neither a report plot file nor inside a stage's plots directory" for p in plotted
                 if p not in report_files and not any(p.startswith(d + "/") for d in plot_dirs)]
    problems += [f"plots: {p} is in the catalog only" for p in report_files if p not in plotted]
    outs = {p for entry in table.values() for p in entry["outs"]}
    problems += [f"artifacts.{name}: {a['path']} is not a catalog out"
                 for name, a in (dvc_yaml.get("artifacts") or {}).items() if a["path"] not in outs]
    return problems


def test_dvc_yaml_and_the_catalog_name_the_same_paths():
    problems = differences(ROOT)
    assert not problems, "dvc.yaml and pipelines/catalog.py disagree:\n  " + "\n  ".join(problems)


def test_a_path_renamed_in_dvc_yaml_only_is_reported_by_stage(tmp_path):
    """The rule can fail: a copy of dvc.yaml with the judged_cots out, a report plot and an artifact renamed."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    for old, new in (("data/judged_cots/${item}.jsonl", "data/judged/${item}.jsonl"),
                     ("- data/report/pareto.png", "- data/report/pareto.svg"),
                     ("path: data/rl_checkpoint", "path: data/rl_model")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / "dvc.yaml").write_text(text, encoding="utf-8")
    categories = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["categories"]
    expected = [line for c in categories for line in (
        f"judged_cots@{c}: outs data/judged/{c}.jsonl is in dvc.yaml only",
        f"judged_cots@{c}: outs {catalog.judged_cots(c).as_posix()} is in the catalog only")]
    expected += ["plots: data/report/pareto.svg is neither a report plot file nor inside a stage's plots directory",
                 f"plots: {catalog.pareto_png().as_posix()} is in the catalog only",
                 "artifacts.rl-checkpoint: data/rl_model is not a catalog out"]
    assert sorted(differences(tmp_path)) == sorted(expected)
