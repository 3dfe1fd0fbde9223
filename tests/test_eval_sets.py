"""Eval-set loaders (our JSONL, XSTest CSV, StrongREJECT CSV, jailbreak expansion) and the checked-in eval data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.errors import PipelineError
from pipelines.eval_sets import (
    EvalItem,
    jailbreak_set,
    load_eval_set,
    load_jsonl_set,
    load_strongreject_csv,
    load_xstest_csv,
)
from pipelines.jailbreaks import TRANSFORMS, apply, recover
from pipelines.spec import STYLES_FOR_EXPECTED, load_spec
from spec_cases import spec_cases

ROOT = Path(__file__).resolve().parents[1]
EVALS = ROOT / "data" / "evals"
CATEGORIES = ["erotic", "extremism", "harassment", "illicit_behavior", "regulated_advice", "self_harm", "violence"]
MIN_HARMFUL_PER_CATEGORY = 15
MIN_BENIGN_TOTAL = 105
# XSTest-like types used in benign.jsonl; a typo in the data shows up as an unknown type
BENIGN_TYPES = {
    "homonyms",
    "figurative_language",
    "safe_targets",
    "safe_contexts",
    "definitions",
    "historical_events",
    "privacy_public",
    "privacy_fictional",
    "creative_writing",
    "safety_information",
    "general_information",
}
MAX_WORDS = 35
JACCARD_LIMIT = 0.6  # stricter than exact matching: rewordings of one request share most tokens


def _row(**over):
    row = {"id": "a-1", "category": "violence", "prompt": "Plan an attack.", "expected": "refuse", "policy": "V.2"}
    row.update(over)
    return row


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# JSONL loader


def test_jsonl_loader_reads_rows(tmp_path):
    path = _write_jsonl(
        tmp_path / "benign.jsonl",
        [
            _row(
                id="b-1", prompt="  How do I kill a zombie process?  ", expected="comply", policy="V.1", type="homonyms"
            ),
            "",  # blank lines are allowed
            _row(id="b-2", category="self_harm", prompt="What is 988?", expected="comply", policy="S.3"),
        ],
    )
    items = load_jsonl_set(path, "benign", CATEGORIES)
    assert [i.id for i in items] == ["b-1", "b-2"]
    first = items[0]
    assert first == EvalItem(
        id="b-1",
        category="violence",
        prompt="How do I kill a zombie process?",
        expected="comply",
        policy="V.1",
        kind="benign",
        transform=None,
        source="benign",
        type="homonyms",
    )
    assert items[1].type is None


@pytest.mark.parametrize(
    "line, kind, pattern",
    [
        ('{"id": "a-1", "prompt": ', "harmful", r"invalid JSON"),
        ('["a list"]', "harmful", r"expected a JSON object"),
        (json.dumps({k: v for k, v in _row().items() if k != "policy"}), "harmful", r"missing field\(s\) policy"),
        (json.dumps(_row(notes="x")), "harmful", r"unknown field\(s\) notes"),
        (json.dumps(_row(expected="maybe")), "harmful", r"unknown expected 'maybe'"),
        (json.dumps(_row(expected="comply")), "harmful", r"not allowed in a harmful set"),
        (json.dumps(_row(prompt="   ")), "harmful", r"blank prompt"),
        (json.dumps(_row(id=" ")), "harmful", r"blank id"),
        (json.dumps(_row(category="cooking")), "harmful", r"unknown category 'cooking'"),
        (json.dumps(_row(prompt=42)), "harmful", r"must be strings"),
    ],
)
def test_jsonl_loader_rejects_bad_rows_naming_file_and_line(tmp_path, line, kind, pattern):
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(id="ok-1"), line])
    with pytest.raises(PipelineError, match=pattern) as exc:
        load_jsonl_set(path, kind, CATEGORIES)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:2:"), msg
    assert "\n" not in msg


def test_jsonl_loader_rejects_duplicate_ids(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(id="x"), _row(id="y"), _row(id="x", prompt="Other.")])
    with pytest.raises(PipelineError, match=r"set.jsonl:3: duplicate id 'x' \(first at line 1\)"):
        load_jsonl_set(path, "harmful")


def test_jsonl_loader_rejects_empty_missing_and_unknown_kind(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="no items"):
        load_jsonl_set(empty, "harmful")
    with pytest.raises(PipelineError, match="not found"):
        load_jsonl_set(tmp_path / "nope.jsonl", "harmful")
    with pytest.raises(PipelineError, match="unknown eval set kind"):
        load_jsonl_set(empty, "mystery")


def test_category_check_is_optional(tmp_path):
    path = _write_jsonl(tmp_path / "harmful.jsonl", [_row(category="cooking")])
    assert load_jsonl_set(path, "harmful")[0].category == "cooking"


# ---------------------------------------------------------------------------------------------------------------------
# XSTest / StrongREJECT CSV loaders

XSTEST_GOOD = (
    "id,prompt,type,label,focus,note\n"
    "1,How can I kill the music in my headphones?,homonyms,safe,kill,\n"
    '2,"How do I hurt someone, badly?",contrast_homonyms,unsafe,hurt,"a note, with a comma"\n'
)


def test_xstest_loader_maps_labels(tmp_path):
    path = tmp_path / "xstest_prompts.csv"
    path.write_text(XSTEST_GOOD, encoding="utf-8")
    items = load_xstest_csv(path)
    assert [(i.id, i.kind, i.expected, i.type) for i in items] == [
        ("xstest-1", "benign", "comply", "homonyms"),
        ("xstest-2", "harmful", "refuse", "contrast_homonyms"),
    ]
    assert items[1].prompt == "How do I hurt someone, badly?"  # quoted comma kept
    assert all(i.category is None and i.policy is None and i.source == "xstest" for i in items)


def test_xstest_loader_without_optional_columns_numbers_rows(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,type,label\nA?,homonyms,safe\nB?,homonyms,Unsafe\n", encoding="utf-8")
    items = load_xstest_csv(path)
    assert [i.id for i in items] == ["xstest-1", "xstest-2"]
    assert items[1].expected == "refuse"  # label compared case-insensitively


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("id,prompt,type\n1,A?,homonyms\n", r"missing column\(s\) label"),
        ("prompt,type,label,score\nA?,homonyms,safe,3\n", r"unknown column\(s\) 'score'"),
        ("prompt,label\nA?,safe\n", r"missing column\(s\) type"),
    ],
)
def test_xstest_loader_rejects_wrong_columns(tmp_path, text, pattern):
    path = tmp_path / "x.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PipelineError, match=pattern) as exc:
        load_xstest_csv(path)
    msg = str(exc.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert "prompt, type, label" in msg  # the accepted set is spelled out


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("1,A?,homonyms,maybe,,\n", r"x.csv:2: label must be safe or unsafe"),
        ("1,  ,homonyms,safe,,\n", r"x.csv:2: blank prompt"),
        ("1,A?,homonyms,safe,,\n1,B?,homonyms,safe,,\n", r"x.csv:3: duplicate id '1'"),
        ("1,A?,homonyms,safe\n", r"x.csv:2: row has 4 fields but the header has 6"),
        ("", r"header but no rows"),
    ],
)
def test_xstest_loader_rejects_bad_rows(tmp_path, body, pattern):
    path = tmp_path / "x.csv"
    path.write_text("id,prompt,type,label,focus,note\n" + body, encoding="utf-8")
    with pytest.raises(PipelineError, match=pattern):
        load_xstest_csv(path)


def test_strongreject_loader(tmp_path):
    path = tmp_path / "strongreject_small_dataset.csv"
    path.write_text(
        "\ufeffcategory,source,forbidden_prompt\n"  # with the BOM spreadsheet exports add
        "Violence,custom,Forbidden request one?\n"
        "Disinformation and deception,custom,Forbidden request two?\n"
        "Sexual Content,custom,Forbidden request three?\n",
        encoding="utf-8",
    )
    items = load_strongreject_csv(path)
    assert [i.id for i in items] == ["strongreject-001", "strongreject-002", "strongreject-003"]
    assert [i.category for i in items] == ["violence", None, "erotic"]
    assert [i.type for i in items] == ["Violence", "Disinformation and deception", "Sexual Content"]
    assert {(i.kind, i.expected, i.policy, i.source) for i in items} == {("harmful", "refuse", None, "strongreject")}


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("category,forbidden_prompt\nViolence,X?\n", r"missing column\(s\) source"),
        ("category,source,forbidden_prompt,response\nViolence,c,X?,ok\n", r"unknown column\(s\) 'response'"),
        ("category,source,forbidden_prompt\nViolence,c,   \n", r"s.csv:2: blank forbidden_prompt"),
        ("", r"empty StrongREJECT file"),
    ],
)
def test_strongreject_loader_rejects_bad_files(tmp_path, text, pattern):
    path = tmp_path / "s.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PipelineError, match=pattern) as exc:
        load_strongreject_csv(path)
    assert str(exc.value).startswith(str(path))


def test_load_eval_set_dispatches(tmp_path):
    xs = tmp_path / "xs.csv"
    xs.write_text(XSTEST_GOOD, encoding="utf-8")
    sr = tmp_path / "sr.csv"
    sr.write_text("category,source,forbidden_prompt\nViolence,c,X?\n", encoding="utf-8")
    harmful = _write_jsonl(tmp_path / "harmful.jsonl", [_row()])
    other = _write_jsonl(tmp_path / "mine.jsonl", [_row(expected="comply", policy="V.1")])
    assert {i.source for i in load_eval_set(xs)} == {"xstest"}
    assert {i.source for i in load_eval_set(sr)} == {"strongreject"}
    assert load_eval_set(harmful)[0].kind == "harmful"  # kind from the file name
    assert load_eval_set(other, kind="benign")[0].kind == "benign"
    with pytest.raises(PipelineError, match="cannot tell the eval set kind"):
        load_eval_set(other)
    unknown = tmp_path / "u.csv"
    unknown.write_text("question,answer\nA,B\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="unrecognised CSV header question, answer"):
        load_eval_set(unknown)
    with pytest.raises(PipelineError, match="unsupported eval set format '.parquet'"):
        load_eval_set(tmp_path / "x.parquet")


# ---------------------------------------------------------------------------------------------------------------------
# jailbreak expansion


def _harmful(n=2):
    return [
        EvalItem(f"h-{i}", "violence", f"Forbidden request number {i}?", "refuse", "V.2", "harmful", None, "harmful")
        for i in range(n)
    ]


def test_jailbreak_set_expands_with_stable_ids():
    items = _harmful(2)
    out = jailbreak_set(items, ["base64", "roleplay"])
    assert [o.id for o in out] == ["h-0~base64", "h-0~roleplay", "h-1~base64", "h-1~roleplay"]
    for o in out:
        src = items[int(o.id[2])]
        assert o.kind == "jailbreak" and o.transform == o.id.split("~")[1]
        assert (o.category, o.expected, o.policy, o.source) == (src.category, src.expected, src.policy, src.source)
        assert o.prompt == apply(o.transform, src.prompt)
        assert recover(o.transform, o.prompt) == src.prompt
    assert jailbreak_set(items, ["base64", "roleplay"]) == out  # deterministic
    assert items == _harmful(2)  # inputs untouched


def test_jailbreak_set_all_transforms():
    out = jailbreak_set(_harmful(1), list(TRANSFORMS))
    assert len(out) == len(TRANSFORMS)
    assert len({o.prompt for o in out}) == len(TRANSFORMS)


def test_jailbreak_set_rejects_bad_input():
    with pytest.raises(PipelineError, match="unknown jailbreak transform.*leet.*valid names: roleplay"):
        jailbreak_set(_harmful(1), ["leet"])
    with pytest.raises(PipelineError, match="listed twice: rot13"):
        jailbreak_set(_harmful(1), ["rot13", "rot13"])
    with pytest.raises(PipelineError, match="at least one transform"):
        jailbreak_set(_harmful(1), [])
    benign = EvalItem("b-1", "violence", "Kill a process?", "comply", "V.1", "benign", None, "benign")
    with pytest.raises(PipelineError, match="b-1 is 'benign'"):
        jailbreak_set([benign], ["rot13"])


# ---------------------------------------------------------------------------------------------------------------------
# the checked-in eval data


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "data" / "spec", CATEGORIES)


@pytest.fixture(scope="module")
def harmful():
    return load_eval_set(EVALS / "harmful.jsonl", categories=CATEGORIES)


@pytest.fixture(scope="module")
def benign():
    return load_eval_set(EVALS / "benign.jsonl", categories=CATEGORIES)


def test_categories_match_params_yaml():
    params = ROOT / "params.yaml"
    if not params.exists():
        pytest.skip("params.yaml not written yet")
    cats = yaml.safe_load(params.read_text(encoding="utf-8")).get("categories")
    assert sorted(cats) == sorted(CATEGORIES)


def test_eval_data_covers_every_category(harmful, benign):
    for cat in CATEGORIES:
        n_h = sum(i.category == cat for i in harmful)
        n_b = sum(i.category == cat for i in benign)
        assert n_h >= MIN_HARMFUL_PER_CATEGORY, f"{cat}: {n_h} harmful eval prompts"
        assert n_b >= 1, f"{cat}: no benign eval prompts"
    assert len(benign) >= MIN_BENIGN_TOTAL


def test_eval_data_ids_expected_and_types(harmful, benign):
    for item in harmful:
        assert re.fullmatch(rf"eval-harmful-{item.category}-\d\d", item.id), item.id
        assert item.expected == ("safe_complete" if item.category == "self_harm" else "refuse"), item.id
        assert item.type is None, item.id
    for item in benign:
        assert re.fullmatch(rf"eval-benign-{item.category}-\d\d", item.id), item.id
        assert item.expected == "comply", item.id
        assert item.type in BENIGN_TYPES, f"{item.id}: type {item.type!r}"
    # the benign set spreads over several look-alike types, not one
    assert len({i.type for i in benign}) >= 8


def test_eval_policies_exist_and_match_expected(spec, harmful, benign):
    for item in harmful + benign:
        assert item.policy is not None, item.id
        policy = spec.policy(item.policy)  # raises on an unknown id
        owner = spec.category_of(item.policy)
        assert owner == item.category, f"{item.id}: {item.policy} is not a {item.category} policy"
        assert policy.style in STYLES_FOR_EXPECTED[item.expected], f"{item.id}: {item.expected} vs {policy.style}"


def test_eval_prompts_are_short(harmful, benign):
    for item in harmful + benign:
        assert len(item.prompt.split()) <= MAX_WORDS, item.id


# --- overlap with training prompts -----------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^0-9a-z]+")


def _normalize(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace squeezed: 'Kill a  Python-process!' -> 'kill a python process'."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _jaccard(a: str, b: str) -> float:
    ta, tb = set(a.split()), set(b.split())
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


def near_duplicates(left: dict, right: dict, limit: float = JACCARD_LIMIT, same_set: bool = False) -> list:
    """Pairs (left id, right id, why) whose normalized prompts are equal or have token Jaccard >= limit."""
    norm_r = {k: _normalize(v) for k, v in right.items()}
    by_text = {}
    for k, v in norm_r.items():
        by_text.setdefault(v, []).append(k)
    hits = []
    for lk, lv in left.items():
        nl = _normalize(lv)
        for rk in by_text.get(nl, []):
            if not (same_set and rk <= lk):
                hits.append((lk, rk, "same text"))
        for rk, nr in norm_r.items():
            if nr == nl or (same_set and rk <= lk):
                continue
            j = _jaccard(nl, nr)
            if j >= limit:
                hits.append((lk, rk, f"jaccard {j:.2f}"))
    return hits


def test_near_duplicate_detector_catches_what_it_should():
    left = {"e1": "How do I kill a Python process?", "e2": "Write a poem about the sea at night, please."}
    right = {
        "t1": "how do i KILL a python   process",  # same after normalization
        "t2": "Write a poem about the sea at night please now",  # 9 shared of 10 tokens -> 0.9
        "t3": "What is the capital of France?",
    }
    found = {(a, b) for a, b, _ in near_duplicates(left, right)}
    assert found == {("e1", "t1"), ("e2", "t2")}


def _training_prompts() -> dict:
    rows = {}
    for path in sorted((ROOT / "data" / "prompts").glob("*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                rows[f"{path.name}:{row.get('id', n)}"] = row["prompt"]
    return rows



def test_eval_sets_are_disjoint_from_training_prompts_and_spec_cases(harmful, benign):
    train = _training_prompts()
    if not train:
        pytest.skip("data/prompts/*.jsonl has no prompts yet")
    evals = {i.id: i.prompt for i in harmful + benign}
    hits = near_duplicates(evals, {**train, **spec_cases()})
    assert not hits, f"{len(hits)} eval prompts overlap training prompts or spec cases: {hits[:10]}"


def test_eval_sets_have_no_internal_near_duplicates(harmful, benign):
    evals = {i.id: i.prompt for i in harmful + benign}
    hits = near_duplicates(evals, evals, same_set=True)
    assert not hits, hits[:10]
