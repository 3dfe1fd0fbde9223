"""The training prompts (data/prompts/<category>.jsonl): valid, enough of both sides per category, and apart from every
evaluation file: no eval prompt (data/evals/**/*.jsonl: the eval sets, the judge, refusal and harm gold sets) or spec
case appears among them, exactly or nearly (normalised text, token Jaccard >= 0.6)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import ROOT
from pipelines.prompts import load_prompts
from pipelines.spec import load_spec
from spec_cases import spec_cases
from test_eval_sets import CATEGORIES, JACCARD_LIMIT, _normalize

MIN_PER_CATEGORY = 60
MIN_SIDE_SHARE = 0.35  # harmful (refuse / safe_complete) and benign (comply) each at least this share of a category
SPEC = load_spec(ROOT / "data/spec", CATEGORIES)
# Two default-set prompts (rows that must stay unchanged, so the default run stays comparable) were later reused as
# context in the refusal classifier's gold voices. That classifier reads the answers only, never the prompt, so it
# learns nothing about these prompts; every other pair of training and evaluation text is kept apart.
REUSED_IN_REFUSAL_GOLD = {"regulated_advice:regulated_advice-07", "self_harm:self_harm-04"}


def _load(cat):
    return load_prompts(ROOT / "data/prompts" / f"{cat}.jsonl", SPEC, cat)


def _training() -> dict:
    return {f"{cat}:{p.id}": p.prompt for cat in CATEGORIES for p in _load(cat)}


def overlaps(left: dict, right: dict, same_set: bool = False) -> list:
    """(left id, right id, why) for normalised texts that are equal or share >= JACCARD_LIMIT of their tokens (the
    rule of test_eval_sets.near_duplicates, with each text's token set built once: ~1 million pairs here)."""
    right_sets = [(k, frozenset(_normalize(v).split())) for k, v in right.items()]
    hits = []
    for lk, lv in left.items():
        a = frozenset(_normalize(lv).split())
        for rk, b in right_sets:
            if same_set and rk <= lk:
                continue
            j = len(a & b) / len(a | b) if a | b else 1.0
            if j >= JACCARD_LIMIT:
                hits.append((lk, rk, "same text" if a == b else f"jaccard {j:.2f}"))
    return hits


def _eval_prompts() -> dict:
    """Every request text of every evaluation file, keyed by file and line."""
    out = {}
    for path in sorted((ROOT / "data/evals").rglob("*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                for key in ("prompt", "forbidden_prompt"):
                    if row.get(key):
                        out[f"{path.relative_to(ROOT)}:{n}"] = row[key]
    return out


@pytest.mark.parametrize("cat", CATEGORIES)
def test_each_category_has_enough_prompts_of_both_sides(cat):
    prompts = _load(cat)  # the schema, ids unique, policy of this category and matching the label
    sides = Counter("benign" if p.expected == "comply" else "harmful" for p in prompts)
    assert len(prompts) >= MIN_PER_CATEGORY, (cat, len(prompts))
    assert min(sides.values()) >= MIN_SIDE_SHARE * len(prompts) and len(sides) == 2, (cat, sides)
    # the default set (the first 14 rows) holds both sides too: a default run still mixes them
    assert {p.expected == "comply" for p in prompts[:14]} == {True, False}


def test_ids_are_unique_across_categories():
    ids = Counter(p.id for cat in CATEGORIES for p in _load(cat))
    assert not [i for i, n in ids.items() if n > 1]


def test_training_prompts_stay_apart_from_every_eval_file_and_spec_case():
    evals = {**_eval_prompts(), **spec_cases()}
    assert len(evals) > 1500  # the eval sets, the three gold sets and the spec cases were all found
    hits = [h for h in overlaps(_training(), evals)
            if not (h[0] in REUSED_IN_REFUSAL_GOLD and h[1].startswith("data/evals/refusal_gold/"))]
    assert not hits, f"{len(hits)} training prompts overlap an eval prompt: {hits[:10]}"


def test_training_prompts_have_no_near_duplicates_among_themselves():
    train = _training()
    hits = overlaps(train, train, same_set=True)
    assert not hits, hits[:10]
