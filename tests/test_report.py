"""report: markdown, JSON, DVC metrics and PNG plots from hand-made eval_scores metrics of three models."""
from __future__ import annotations

import csv
import json
import struct

import pytest
import yaml

from conftest import fake_params, run_cli
from pipelines.report import build_tables, dvc_metrics, worst_examples

CATS = ["violence", "self_harm", "regulated_advice"]
# Hand-made metrics: numbers picked so every cell of the tables is distinct and easy to find.
HEADLINE = {
    "base": {"not_unsafe": 0.125, "not_overrefuse": 0.875, "jailbreak_goodness": 0.411, "jailbreak_goodness_at_q": 0.062},
    "sft": {"not_unsafe": 0.625, "not_overrefuse": 0.750, "jailbreak_goodness": 0.733, "jailbreak_goodness_at_q": 0.437},
    "rl": {"not_unsafe": 0.812, "not_overrefuse": 0.812, "jailbreak_goodness": 0.904, "jailbreak_goodness_at_q": 0.688},
}
PER_CAT = {  # model -> category -> (not_unsafe, not_overrefuse, goodness@q)
    "base": {"violence": (0.1, 0.9, 0.05), "self_harm": (0.2, 0.95, 0.15), "regulated_advice": (0.0, 1.0, 0.0)},
    "sft": {"violence": (0.6, 0.7, 0.45), "self_harm": (0.65, 0.8, 0.4), "regulated_advice": (0.55, 0.6, 0.35)},
    # rl has no regulated_advice items at all: the report must show a gap, not a zero
    "rl": {"violence": (0.85, 0.8, 0.7), "self_harm": (0.9, 0.85, 0.75)},
}


def metrics_for(model: str) -> dict:
    h = HEADLINE[model]
    return {
        "model": model, "generator": f"transformers:data/{model}", "judge": "rubric", "items": 40, "n_harmful": 8,
        "n_benign": 8, "n_jailbreak": 24, "goodness_q": 0.1, "not_unsafe_string": round(h["not_unsafe"] - 0.001, 4),
        "not_overrefuse_string": h["not_overrefuse"], "refusal_agreement": 0.95, "refusal_kappa": 0.9,
        "style_hard_refusal": 0.3, "unparsed_rate": 0.05, "unparsed": 2, "no_close_tag": 2, **h,
        "per_category": {c: {"items": 10, "not_unsafe": v[0], "not_overrefuse": v[1], "jailbreak_goodness_at_q": v[2]}
                         for c, v in PER_CAT[model].items()},
        "per_transform": {"rot13": {"items": 4, "not_unsafe": 0.5, "goodness": h["jailbreak_goodness"] - 0.01}},
        "per_style": {"hard_refusal": {"items": 8, "adherence": 0.3, "judge_pass": 0.25, "apology": 0.5}},
    }


def png_size(path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def three_models(workdir):
    p = fake_params(categories=CATS)
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    for m in HEADLINE:
        path = workdir / "data/metrics/eval_scores" / f"{m}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics_for(m)))
    # results only for sft: examples come from there, the others have none
    rows = [{"id": f"x~{t}", "kind": "jailbreak", "transform": t, "goodness": g, "refused_judge": False,
             "answer": f"answer of {t} " + "word " * 200} for t, g in (("rot13", 0.25), ("base64", 0.5), ("roleplay", 0.25))]
    res = workdir / "data/eval_scores/sft/results.jsonl"
    res.parent.mkdir(parents=True)
    res.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def test_report_stage_writes_tables_metrics_and_plots(three_models):
    wd = three_models
    proc = run_cli("report", cwd=wd, check=True)
    assert "not_unsafe (judge)" in proc.stdout
    md = (wd / "data/report/report.md").read_text()
    lines = md.splitlines()
    # headline: one row per metric, one column per model, in params order
    header = next(ln for ln in lines if ln.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")][1:4] == ["base", "sft", "rl"]
    row = next(ln for ln in lines if ln.startswith("| not_unsafe (judge)"))
    assert [c.strip() for c in row.strip("|").split("|")][1:4] == ["0.125", "0.625", "0.812"]
    row = next(ln for ln in lines if ln.startswith("| jailbreak goodness@0.1"))
    assert [c.strip() for c in row.strip("|").split("|")][1:4] == ["0.062", "0.437", "0.688"]
    # per category: rl has no regulated_advice value -> a dash, not 0.000
    sec = md.split("## not_unsafe (judge) by category", 1)[1].split("##", 1)[0]
    ra = next(ln for ln in sec.splitlines() if ln.startswith("| regulated_advice"))
    assert [c.strip() for c in ra.strip("|").split("|")][1:4] == ["0.000", "0.550", "–"]
    # examples: the two lowest-goodness sft answers (ties by id), cut to example_chars
    assert "`x~roleplay`" in md and "`x~rot13`" in md and "`x~base64`" not in md

    rep = json.loads((wd / "data/report/report.json").read_text())
    assert rep["models"] == ["base", "sft", "rl"]
    assert rep["headline"]["not_overrefuse"] == {"base": 0.875, "sft": 0.75, "rl": 0.812}
    assert rep["per_category"]["not_unsafe"]["self_harm"] == {"base": 0.2, "sft": 0.65, "rl": 0.9}
    assert rep["per_category"]["not_unsafe"]["regulated_advice"]["rl"] is None

    dm = json.loads((wd / "data/metrics/report.json").read_text())
    assert dm["rl"]["not_unsafe"] == 0.812
    assert dm["rl_minus_base"]["not_unsafe"] == pytest.approx(0.812 - 0.125, abs=1e-4)
    assert dm["sft_minus_base"]["jailbreak_goodness_at_q"] == pytest.approx(0.437 - 0.062, abs=1e-4)

    for name in ("pareto.png", "per_category.png"):
        w, h = png_size(wd / "data/report" / name)
        assert w >= 600 and h >= 500, (name, w, h)
    pareto = json.loads((wd / "data/report/plots/pareto_sft.json").read_text())
    assert pareto == [{"model": "sft", "not_overrefuse": 0.75, "jailbreak_goodness_at_q": 0.437}]
    with open(wd / "data/report/plots/per_category_rl.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["category"] for r in rows] == ["violence", "self_harm"]
    assert float(rows[1]["not_unsafe"]) == 0.9


def test_report_fails_clearly_when_a_model_was_not_evaluated(three_models):
    (three_models / "data/metrics/eval_scores/rl.json").unlink()
    proc = run_cli("report", cwd=three_models)
    assert proc.returncode == 2
    assert "rl.json" in proc.stderr and "eval_scores@rl" in proc.stderr
    assert not (three_models / "data/report/report.md").exists()


def test_build_tables_and_dvc_metrics_pure():
    metrics = {m: metrics_for(m) for m in HEADLINE}
    t = build_tables(metrics)
    assert t["per_transform"]["rot13"]["sft"] == pytest.approx(0.723)
    assert t["per_style"]["hard_refusal"]["base"]["adherence"] == 0.3
    d = dvc_metrics(metrics)
    assert set(d) == {"base", "sft", "rl", "sft_minus_base", "rl_minus_base"}
    metrics["rl"]["goodness_q"] = 0.2
    with pytest.raises(Exception, match="goodness_q"):
        build_tables(metrics)


def test_worst_examples_prefers_jailbreaks_and_clips():
    rows = [{"id": "a", "kind": "harmful", "goodness": 0.0, "answer": "x"},
            {"id": "b~rot13", "kind": "jailbreak", "transform": "rot13", "goodness": 0.5, "answer": "y " * 100},
            {"id": "c~base64", "kind": "jailbreak", "transform": "base64", "goodness": 0.9, "answer": "z"}]
    ex = worst_examples(rows, 1, 20)
    assert [e["id"] for e in ex] == ["b~rot13"]
    assert len(ex[0]["answer"]) == 20 and ex[0]["answer"].endswith("...")


def test_pareto_labels_keep_order_and_gap_within_the_axes():
    from pipelines.report import spread

    ys = [0.20, 0.32, 0.20, 0.95, 0.97]
    out = spread(ys, gap=0.12, lo=0.02, hi=1.0)
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [out[i] for i in order]
    assert all(b - a >= 0.12 - 1e-9 for a, b in zip(placed, placed[1:]))  # no two labels overlap
    assert abs(placed[-1] - 1.0) < 1e-9 and placed[0] >= 0.02  # pushed down from the top edge, order kept
    assert spread([0.1, 0.5, 0.9], gap=0.12, lo=0.02, hi=1.0) == [0.1, 0.5, 0.9]  # far apart: labels at their points
