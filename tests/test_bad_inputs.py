"""Bad-input matrix: each malformed input makes the stage exit != 0 with ONE line naming the file/key/row, and the
previous outputs stay byte-for-byte as they were."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, fake_params, run_cli

CAT = "violence"
SPEC = "data/spec/categories/violence.md"
PROMPTS = "data/prompts/violence.jsonl"


def _yaml(mut):
    def apply(d: Path):
        p = yaml.safe_load((d / "params.yaml").read_text())
        mut(p)
        (d / "params.yaml").write_text(yaml.safe_dump(p))
    return apply


def _text(path, fn):
    def apply(d: Path):
        f = d / path
        f.write_text(fn(f.read_text()))
    return apply


def _bytes(path, data):
    def apply(d: Path):
        (d / path).write_bytes(data)
    return apply


def _prompt_row(fn):
    """Rewrite the 3rd prompt row (file line 3) with fn(row) -> row or raw string."""
    def apply(d: Path):
        f = d / PROMPTS
        lines = f.read_text().splitlines()
        row = json.loads(lines[2])
        new = fn(row)
        lines[2] = new if isinstance(new, str) else json.dumps(new)
        f.write_text("\n".join(lines) + "\n")
    return apply


def _drop(key):
    def fn(row):
        row.pop(key)
        return row
    return fn


def _set(key, value):
    def fn(row):
        row[key] = value
        return row
    return fn


def _unlink(path):
    return lambda d: (d / path).unlink()


# (case id, stage, mutation, words the one-line error must contain)
CASES = [
    # params.yaml
    ("params-unknown-key", "raw_cots", _yaml(lambda p: p["raw_cots"].update(temprature=1)), ["params.yaml", "raw_cots.temprature", "unknown key"]),
    ("params-wrong-type", "raw_cots", _yaml(lambda p: p["raw_cots"].update(n_samples="many")), ["raw_cots.n_samples", "integer"]),
    ("params-negative-size", "raw_cots", _yaml(lambda p: p["raw_cots"].update(shard_size=-4)), ["raw_cots.shard_size", "greater than 0"]),
    ("params-zero-tokens", "raw_cots", _yaml(lambda p: p["raw_cots"]["sampling"].update(max_new_tokens=0)), ["raw_cots.sampling.max_new_tokens"]),
    ("params-missing-model-path", "raw_cots", _yaml(lambda p: p["base_model"].update(local_path="models/nope")), ["base_model.local_path", "models/nope"]),
    ("params-bad-backend-kind", "raw_cots", _yaml(lambda p: p["raw_cots"].update(generator={"kind": "magic"})), ["raw_cots.generator", "magic"]),
    ("params-llm-judge-no-backend", "judged_cots", _yaml(lambda p: p["judged_cots"]["judge"].update(kind="llm")), ["judged_cots.judge", "backend"]),
    ("params-bounds-reversed", "judged_cots", _yaml(lambda p: p["judged_cots"].update(pass_rate_bounds=[0.9, 0.1])), ["judged_cots.pass_rate_bounds"]),
    ("params-not-a-mapping", "raw_cots", lambda d: (d / "params.yaml").write_text("- just\n- a list\n"), ["params.yaml", "mapping"]),
    ("params-invalid-yaml", "raw_cots", lambda d: (d / "params.yaml").write_text("raw_cots: {n_samples: 2\n"), ["params.yaml", "invalid YAML"]),
    ("params-not-utf8", "raw_cots", _bytes("params.yaml", b"categories: [viol\xffence]\n"), ["params.yaml", "not UTF-8"]),
    ("params-missing-spec-dir", "spec_chunks", _yaml(lambda p: p["paths"].update(spec="data/nospec")), ["paths.spec", "data/nospec"]),
    # spec
    ("spec-missing-category-file", "spec_chunks", _unlink(SPEC), [SPEC, "not found"]),
    ("spec-duplicate-id", "spec_chunks", _text(SPEC, lambda t: t.replace("## V.2 ", "## V.1 ", 1)), [SPEC, "duplicated policy id V.1"]),
    ("spec-empty-file", "spec_chunks", _text(SPEC, lambda t: ""), [SPEC, "empty policy file"]),
    ("spec-non-utf8", "spec_chunks", _bytes(SPEC, b"# Violence (V)\n\n## V.1 Caf\xe9\nStyle: full_compliance\nText.\n"), [SPEC, "not UTF-8"]),
    ("spec-unknown-style", "spec_chunks", _text(SPEC, lambda t: t.replace("Style: hard_refusal", "Style: grumpy", 1)), [SPEC, "unknown style 'grumpy'"]),
    ("spec-missing-style-line", "spec_chunks", _text(SPEC, lambda t: t.replace("Style: hard_refusal\n", "", 1)), [SPEC, "must start with 'Style:"]),
    ("spec-bad-title", "spec_chunks", _text(SPEC, lambda t: "Violence\n" + t.split("\n", 1)[1]), [SPEC + ":1", "first line"]),
    ("spec-missing-overview", "spec_chunks", _unlink("data/spec/overview.md"), ["overview.md", "not found"]),
    ("spec-missing-style-file", "spec_chunks", _unlink("data/spec/styles/hard_refusal.md"), ["hard_refusal.md", "not found"]),
    # prompts
    ("prompts-missing-label", "raw_cots", _prompt_row(_drop("expected")), [PROMPTS + ":3", "missing field", "expected"]),
    ("prompts-unknown-label", "raw_cots", _prompt_row(_set("expected", "maybe")), [PROMPTS + ":3", "unknown expected 'maybe'"]),
    ("prompts-unknown-category", "raw_cots", _prompt_row(_set("category", "weather")), [PROMPTS + ":3", "'weather'"]),
    ("prompts-duplicate-id", "raw_cots", _prompt_row(_set("id", "violence-01")), [PROMPTS + ":3", "duplicate id 'violence-01'"]),
    ("prompts-blank-prompt", "raw_cots", _prompt_row(_set("prompt", "   ")), [PROMPTS + ":3", "blank prompt"]),
    ("prompts-bad-json", "raw_cots", _prompt_row(lambda r: '{"id": "violence-03", "prompt": '), [PROMPTS + ":3", "invalid JSON"]),
    ("prompts-foreign-policy", "raw_cots", _prompt_row(_set("policy", "H.1")), [PROMPTS + ":3", "'H.1' is not a policy of category 'violence'"]),
    ("prompts-label-contradicts-policy", "raw_cots", _prompt_row(lambda r: {**r, "expected": "comply", "policy": "V.2"}), [PROMPTS + ":3", "contradicts policy V.2"]),
    ("prompts-file-missing", "raw_cots", _unlink(PROMPTS), [PROMPTS, "not found"]),
    # upstream data
    ("raw-cots-garbage-line", "judged_cots", _text("data/raw_cots/violence.jsonl", lambda t: t + "{not json\n"), ["data/raw_cots/violence.jsonl:", "invalid JSON"]),
    ("spec-chunk-missing", "raw_cots", _unlink("data/spec_chunks/violence.md"), ["data/spec_chunks/violence.md", "not found"]),
]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A workdir where spec_chunks -> raw_cots -> judged_cots already ran for one category."""
    d = tmp_path_factory.mktemp("baseline")
    for sub in ("data/spec", "data/prompts"):
        shutil.copytree(ROOT / sub, d / sub)
    (d / "params.yaml").write_text(yaml.safe_dump(fake_params(categories=[CAT])))
    for stage in ("spec_chunks", "raw_cots", "judged_cots"):
        run_cli(stage, "--category", CAT, cwd=d, check=True)
    return d


def outputs(d: Path) -> dict:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for sub in ("data/spec_chunks", "data/raw_cots", "data/judged_cots", "data/metrics")
            for f in sorted((d / sub).rglob("*")) if f.is_file()}


def test_matrix_has_enough_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case, stage, mutate, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(baseline, tmp_path, case, stage, mutate, words):
    d = tmp_path / "w"
    shutil.copytree(baseline, d)
    mutate(d)
    before = outputs(d)  # after the edit (which may itself touch an upstream output), before the failing run
    proc = run_cli(stage, "--category", CAT, cwd=d)
    assert proc.returncode != 0, proc.stdout[-500:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in errors[0], errors[0]
    assert outputs(d) == before  # the failed run wrote nothing and left previous outputs as they were
