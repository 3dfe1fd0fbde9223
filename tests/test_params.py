"""params.yaml validation: every bad value is a one-line error naming the key, exit code != 0, nothing written."""
from __future__ import annotations

import pytest
import yaml

from conftest import fake_params, run_cli
from pipelines.errors import PipelineError
from pipelines.params import load_params, parse_params


def test_default_params_yaml_is_valid():
    from conftest import ROOT
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        p = load_params(ROOT / "params.yaml")
    finally:
        os.chdir(cwd)
    assert len(p.categories) >= 7 and p.judged_cots.judge.kind == "rubric"


@pytest.mark.parametrize(
    "mutate, key, words",
    [
        (lambda p: p["raw_cots"].update(n_sampels=2), "raw_cots.n_sampels", "unknown key"),
        (lambda p: p["raw_cots"].update(n_samples="two"), "raw_cots.n_samples", "integer"),
        (lambda p: p["raw_cots"].update(n_samples=-1), "raw_cots.n_samples", "greater than 0"),
        (lambda p: p["raw_cots"]["sampling"].update(top_p=1.5), "raw_cots.sampling.top_p", "less than or equal"),
        (lambda p: p["base_model"].update(local_path="no/such/dir"), "base_model.local_path", "not found"),
        (lambda p: p["judged_cots"]["judge"].update(kind="llm"), "judged_cots.judge", "backend"),
        (lambda p: p["judged_cots"]["judge"].update(threshold=11), "judged_cots.judge.threshold", "less than"),
        (lambda p: p.update(categories=["violence", "violence"]), "categories", "duplicated"),
        (lambda p: p.update(categories=["Bad Name"]), "categories.0", "pattern"),
        (lambda p: p["raw_cots"].update(generator={"kind": "gpt"}), "raw_cots.generator", "kind"),
        (lambda p: p["paths"].update(spec="nowhere"), "paths.spec", "not found"),
    ],
)
def test_bad_params_name_the_key(workdir, mutate, key, words):
    p = fake_params()
    mutate(p)
    with pytest.raises(PipelineError) as e:
        parse_params(p)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and words in msg, msg


def test_cli_bad_params_exit_nonzero_and_write_nothing(workdir):
    p = fake_params()
    p["raw_cots"]["n_sampels"] = 3
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    proc = run_cli("spec_chunks", "--category", "violence", cwd=workdir)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "raw_cots.n_sampels: unknown key" in err[0]
    assert not (workdir / "data" / "spec_chunks").exists()


def test_cli_unknown_category_and_bad_yaml(workdir):
    proc = run_cli("spec_chunks", "--category", "weather", cwd=workdir)
    assert proc.returncode == 2 and "'weather' is not in params.yaml" in proc.stderr
    (workdir / "params.yaml").write_text("categories: [violence\n")
    proc = run_cli("spec_chunks", "--category", "violence", cwd=workdir)
    assert proc.returncode == 2 and "params.yaml" in proc.stderr and "invalid YAML" in proc.stderr
