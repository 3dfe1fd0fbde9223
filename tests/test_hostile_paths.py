"""Class 5 of issue 21: paths checked late or not at all.

Promise: a path given on the command line or in params.yaml that cannot serve (an output that is a directory, lies
under a file or in an unwritable place; an input that is missing, a directory or not a regular file; `paths.work`
outside the project or over an input) is refused before any work, with one line naming the option or key and the
path; exit 2; nothing written. Before: `evaluate --out` failed with a traceback after the whole evaluation, a
directory given as --eval, --params or a spec category file was a traceback, and paths.work could be anywhere.
"""
from __future__ import annotations

import os
import random

import pytest
import yaml

from pipelines.errors import PipelineError
from pipelines.params import parse_params
from test_hostile_common import cwd, make_project, minimal_params, refused, run_cli, snapshot


def bad_outputs(project, rng: random.Random):
    """(--out value, words the error must hold) for many ways an output path cannot be written."""
    (project / "afile").write_text("x")
    (project / "adir").mkdir()
    os.symlink(project / "nowhere", project / "dangling")
    out = []
    for _ in range(8):
        name = f"r{rng.randint(0, 999)}.json"
        out += [
            (str(project / "adir"), "is a directory"),
            ("adir", "is a directory"),
            (f"afile/{name}", "is a file"),
            (f"afile/deeper/{rng.randint(0, 9)}/{name}", "is a file"),
            (f"/proc/hostile-{rng.randint(0, 999)}/{name}", "cannot write"),
            (f"/proc/{name}", "cannot write"),
            (f"dangling/{name}", "broken symbolic link"),
        ]
    return out


def test_evaluate_out_is_checked_before_the_model_is_touched(tmp_path):
    """--model names nothing: if the output were checked late, the error would be about the model."""
    project = make_project(tmp_path / "p")
    evals = project / "data/evals/harmful.jsonl"
    evals.write_text('{"id": "h1", "category": "violence", "prompt": "p", "expected": "refuse", "policy": "V.2"}\n')
    rng = random.Random(0)
    cases = bad_outputs(project, rng)
    for out, why in cases:
        before = snapshot(project)
        refused(run_cli("evaluate", "--model", "no/such/model", "--eval", str(evals), "--out", out, project=project),
                "--out", out, why)
        assert snapshot(project) == before, out
    assert len(cases) >= 50


def test_evaluate_eval_and_params_inputs_must_be_regular_files(tmp_path):
    project = make_project(tmp_path / "p")
    (project / "adir").mkdir()
    os.mkfifo(project / "fifo")  # reading it would block for ever
    cases = [
        (["--eval", "adir"], ["--eval", "adir", "directory"]),
        (["--eval", "missing.jsonl"], ["--eval", "missing.jsonl", "not found"]),
        (["--eval", "fifo"], ["--eval", "fifo", "not a regular file"]),
        (["--eval", "/dev/zero"], ["--eval", "/dev/zero", "not a regular file"]),
        (["--eval", "data/evals", "--params", "adir"], ["adir", "directory"]),
        (["--eval", "data/evals", "--params", "fifo"], ["fifo", "not a regular file"]),
        (["--eval", "data/evals", "--params", "nope.yaml"], ["nope.yaml", "not found"]),
    ]
    for args, words in cases:
        before = snapshot(project)
        refused(run_cli("evaluate", "--model", "no/such/model", *args, "--out", "r.json", project=project), *words)
        assert snapshot(project) == before


def test_input_files_that_are_directories_are_one_line(tmp_path):
    """A spec category file, the overview, a style file or a prompts file replaced by a directory."""
    for i, rel in enumerate(["data/spec/categories/violence.md", "data/spec/overview.md",
                             "data/spec/styles/hard_refusal.md", "data/prompts/violence.jsonl"]):
        project = make_project(tmp_path / f"p{i}")
        if rel.startswith("data/prompts"):
            assert run_cli("spec_chunks", "--category", "violence", project=project).code == 0
        (project / rel).unlink()
        (project / rel).mkdir()
        before = snapshot(project)
        stage = "raw_cots" if rel.startswith("data/prompts") else "spec_chunks"
        refused(run_cli(stage, "--category", "violence", project=project), rel, "directory")
        assert snapshot(project) == before


def bad_work_dirs(rng: random.Random):
    fixed = ["/tmp/work", "/", "~", "~/work", "..", "../work", "data/../../work", "a/../../b", ".", "./", "",
             "   ", "data", "data/spec", "data/spec/work", "data/prompts/.work", "data/evals", "data\\..\\..\\w"]
    rand = []
    for _ in range(40):
        depth = rng.randint(1, 4)
        parts = [rng.choice(["..", "x", "data", ".work"]) for _ in range(depth)]
        if ".." not in parts:
            parts.insert(rng.randrange(len(parts) + 1), "..")
            parts.append("..")
            parts += [".."] * depth
        rand.append("/".join(parts))
        rand.append("/" + "/".join(p for p in parts if p != ".."))
    return fixed + rand


def test_paths_work_must_stay_inside_the_project_and_apart_from_inputs(tmp_path):
    project = make_project(tmp_path / "p")
    (project / "data/work_is_a_file").write_text("x")
    rng = random.Random(1)
    values = bad_work_dirs(rng) + ["data/work_is_a_file"]
    with cwd(project):
        for value in values:
            p = minimal_params()
            p["paths"] = {"work": value}
            with pytest.raises(PipelineError) as e:
                parse_params(p)
            assert "paths.work" in str(e.value) and "\n" not in str(e.value), (value, str(e.value))
        for ok in ("data/.work", "work", "data/scratch/w"):
            assert parse_params({**minimal_params(), "paths": {"work": ok}}).paths.work == ok
    # and through the CLI: nothing written
    (project / "params.yaml").write_text(yaml.safe_dump({**minimal_params(), "paths": {"work": "../outside"}}))
    before = snapshot(project)
    refused(run_cli("raw_cots", "--category", "violence", project=project), "paths.work")
    assert snapshot(project) == before
    assert len(values) >= 90
