"""Spec parsing, spec(category) chunking and malformed-spec errors."""
from __future__ import annotations

import shutil

import pytest

from conftest import ROOT
from pipelines.errors import PipelineError
from pipelines.spec import STYLES, load_spec

CATS = ["erotic", "extremism", "harassment", "illicit_behavior", "regulated_advice", "self_harm", "violence"]


def test_real_spec_loads_with_unique_ids():
    spec = load_spec(ROOT / "data/spec", CATS)
    ids = [p.id for c in spec.categories.values() for p in c.policies]
    assert len(ids) == len(set(ids)) and len(spec.categories) == 7
    for c in spec.categories.values():
        assert all(p.id.startswith(c.prefix + ".") and p.style in STYLES and p.text for p in c.policies)
        assert any(p.style == "hard_refusal" for p in c.policies) or c.name == "self_harm"


def test_chunk_has_overview_own_policy_and_used_styles_only():
    spec = load_spec(ROOT / "data/spec", CATS)
    chunk = spec.chunk("violence")
    assert spec.overview.strip() in chunk and spec.categories["violence"].text.strip() in chunk
    assert spec.categories["harassment"].text.strip() not in chunk
    used = {p.style for p in spec.categories["violence"].policies}
    for style, text in spec.styles.items():
        assert (text.strip() in chunk) == (style in used)
    # short enough for a small model's context (DESIGN: aim <= ~700 tokens)
    assert max(len(spec.chunk(c).split()) for c in CATS) < 600


@pytest.fixture
def spec_copy(tmp_path):
    shutil.copytree(ROOT / "data/spec", tmp_path / "spec")
    return tmp_path / "spec"


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_missing_category_file(spec_copy):
    (spec_copy / "categories/violence.md").unlink()
    with pytest.raises(PipelineError, match=r"violence\.md: policy file for category 'violence' not found"):
        load_spec(spec_copy, CATS)


def test_duplicated_id(spec_copy):
    _edit(spec_copy / "categories/violence.md", "## V.2 ", "## V.1 ")
    with pytest.raises(PipelineError, match=r"violence\.md:\d+: duplicated policy id V\.1"):
        load_spec(spec_copy, CATS)


def test_empty_policy_and_empty_file(spec_copy):
    path = spec_copy / "categories/violence.md"
    text = path.read_text()
    head, rest = text.split("## V.2 ", 1)
    title, _ = rest.split("\n", 1)
    after = rest.split("\n## ", 1)[1]
    path.write_text(f"{head}## V.2 {title}\n\n## {after}")
    with pytest.raises(PipelineError, match=r"policy V\.2 is empty"):
        load_spec(spec_copy, CATS)
    path.write_text("  \n")
    with pytest.raises(PipelineError, match="empty policy file"):
        load_spec(spec_copy, CATS)


def test_unknown_style_wrong_prefix_and_non_utf8(spec_copy):
    path = spec_copy / "categories/violence.md"
    original = path.read_bytes()
    _edit(path, "Style: hard_refusal", "Style: shouting")
    with pytest.raises(PipelineError, match="unknown style 'shouting'"):
        load_spec(spec_copy, CATS)
    path.write_bytes(original.replace(b"## V.2 ", b"## H.9 ", 1))
    with pytest.raises(PipelineError, match="does not start with this category's prefix V"):
        load_spec(spec_copy, CATS)
    path.write_bytes(original + b"\xff\xfe")
    with pytest.raises(PipelineError, match="not UTF-8"):
        load_spec(spec_copy, CATS)
