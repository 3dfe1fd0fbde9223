"""Materialization metadata the Dagster UI renders: JSONL outs as tables (row count, column schema), images inline,
cards' front matter, and code references of every stage; each recorded by a real Dagster run or definition."""
from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import dagster as dg

from conftest import ROOT
from dagster_project import metadata as md_module
from dagster_project.manifest import DvcManifest, Out, StageItem
from dagster_project.metadata import code_references, item_metadata
from pipelines.model_card import write_model_card


def _manifest(root: Path, item: StageItem) -> DvcManifest:
    return DvcManifest(root, [item], raw={}, lock={}, params_files={})


def _recorded(metadata: dict) -> dict:
    """The metadata as a real materialization stores it (Dagster normalises and validates every value)."""

    @dg.asset(name="carded")
    def carded() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata=metadata)

    result = dg.materialize([carded], instance=dg.DagsterInstance.ephemeral())
    (event,) = result.get_asset_materialization_events()
    return event.event_specific_data.materialization.metadata


def _rows(path: Path) -> list:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_jsonl_outs_get_row_count_and_column_schema(tmp_path):
    out = tmp_path / "data/eval_scores/sft"
    out.mkdir(parents=True)
    shutil.copy(ROOT / "data/prompts/violence.jsonl", out / "a.jsonl")
    shutil.copy(ROOT / "data/evals/harmful.jsonl", out / "b.jsonl")
    (out / "b.jsonl").write_text((out / "b.jsonl").read_text() + "\n\n")  # blank lines are not rows
    item = StageItem(name="eval_scores@sft", stage="eval_scores", key="sft", cmd="c", deps=(),
                     outs=(Out("data/eval_scores/sft"),), params=())
    md = _recorded(item_metadata(_manifest(tmp_path, item), item, reused=False))

    rows = {p: _rows(out / p) for p in ("a.jsonl", "b.jsonl")}
    assert md["dagster/row_count"].value == md["rows"].value == sum(map(len, rows.values()))
    assert md["rows/data/eval_scores/sft/b.jsonl"].value == len(rows["b.jsonl"])
    columns = md["dagster/column_schema"].schema.columns
    assert [c.name for c in columns] == list(dict.fromkeys(k for p in ("a.jsonl", "b.jsonl") for r in rows[p]
                                                           for k in r))
    first = rows["a.jsonl"][0]
    for c in columns:
        if c.name in first and isinstance(first[c.name], str):
            assert c.type == "string", c


def test_a_jsonl_that_polars_cannot_read_still_counts_rows(tmp_path):
    out = tmp_path / "data/raw_cots/a.jsonl"
    out.parent.mkdir(parents=True)
    out.write_text('{"x": 1}\n{"x": \n')
    item = StageItem(name="raw_cots@a", stage="raw_cots", key="a", cmd="c", deps=(),
                     outs=(Out("data/raw_cots/a.jsonl"),), params=())
    md = item_metadata(_manifest(tmp_path, item), item, reused=True)
    assert md["rows"] == 2 and "dagster/column_schema" not in md


def test_report_images_are_inline_and_cards_show_their_front_matter(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = tmp_path / "data/report"
    report.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(report / "pareto.png", dpi=40)
    plt.close(fig)
    (report / "report.md").write_text("# Evaluation report\n\n| model | not_unsafe |\n|---|---|\n| sft | 0.9 |\n")
    (report / "plots").mkdir()
    (report / "plots/per_category_sft.csv").write_text("category,not_unsafe\nviolence,1.0\n")
    item = StageItem(name="report", stage="report", key=None, cmd="c", deps=(), outs=(Out("data/report"),), params=())
    md = _recorded(item_metadata(_manifest(tmp_path, item), item, reused=False))

    image = md["plot/data/report/pareto.png"]
    assert isinstance(image, dg.MarkdownMetadataValue)
    m = re.fullmatch(r"!\[data/report/pareto\.png\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", image.value)
    assert m and base64.b64decode(m.group(1)) == (report / "pareto.png").read_bytes()
    assert isinstance(md["plot/data/report/plots/per_category_sft.csv"], dg.PathMetadataValue)
    assert md["markdown"].value.startswith("# Evaluation report")

    monkeypatch.setattr(md_module, "MAX_INLINE_IMAGE", 100)  # too big for the event log: a path instead
    big = item_metadata(_manifest(tmp_path, item), item, reused=False)["plot/data/report/pareto.png"]
    assert isinstance(big, dg.PathMetadataValue) and big.value == str(report / "pareto.png")

    # a checkpoint's model card: the front matter as JSON, the body as markdown
    ckpt = tmp_path / "data/sft_checkpoint"
    ckpt.mkdir()
    monkeypatch.chdir(tmp_path)
    write_model_card(ckpt, {"stage": "sft_checkpoint", "params": {"lr": 1}, "seed": 0})
    item = StageItem(name="sft_checkpoint", stage="sft_checkpoint", key=None, cmd="c", deps=(),
                     outs=(Out("data/sft_checkpoint"),), params=())
    md = item_metadata(_manifest(tmp_path, item), item, reused=False)
    assert md["card"].value["library_name"] == "transformers"
    assert md["markdown"].value.startswith("# sft_checkpoint")


def test_every_stage_has_code_references_to_its_module_and_dvc_yaml_entry():
    manifest = DvcManifest.load(ROOT)
    specs = [dg.AssetSpec(name, metadata=code_references(manifest, stage)) for name, stage in manifest.stages.items()]
    defs = dg.Definitions(assets=specs)
    for spec in defs.resolve_all_asset_specs():
        refs = spec.metadata["dagster/code_references"].code_references
        module, entry = refs
        text = Path(module.file_path).read_text().splitlines()
        assert Path(module.file_path).parent == ROOT / "pipelines"
        assert text[module.line_number - 1].startswith("def main"), (spec.key, module)
        lines = Path(entry.file_path).read_text().splitlines()
        assert entry.file_path == str(ROOT / "dvc.yaml")
        assert lines[entry.line_number - 1].strip().split(":")[0] == spec.key.to_user_string()
