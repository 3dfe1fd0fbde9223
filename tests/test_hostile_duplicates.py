"""Class 2 of issue 21: a key given twice, in params.yaml (any section, any depth) or in a JSONL record.

Promise: one line naming the file, the line and the key; exit 2 from the CLI; nothing written. Before, PyYAML and
json.loads kept the last value: a second `raw_cots:` replaced the first with schema defaults, a second
`categories:` dropped categories, a duplicate JSONL key let the last value win.
"""
from __future__ import annotations

import json
import random
import re

import pytest
import yaml

from pipelines.errors import PipelineError
from pipelines.io import iter_jsonl
from pipelines.params import Params, load_params
from test_hostile_common import assert_one_line, make_project, refused, run_cli, snapshot


def full_params_yaml() -> str:
    """Every section and key of the schema with its default, in block style: the document duplicates are made in."""
    data = Params(categories=["violence"]).model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=10_000)


def key_lines(lines):
    """(index, indent, key) of every `key:` line of a block-style YAML document."""
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_]*):", line)
        if m:
            out.append((i, len(m[1]), m[2]))
    return out


def duplicate_a_key(text: str, rng: random.Random):
    """Copy one random `key: ...` block (with its nested lines) to another place in the same mapping.
    Returns (new text, key, 1-based line of the copy)."""
    lines = text.splitlines()
    candidates = key_lines(lines)
    i, indent, key = rng.choice(candidates)
    j = i + 1
    while j < len(lines) and (len(lines[j]) - len(lines[j].lstrip(" ")) > indent or
                              lines[j].lstrip(" ").startswith("- ") and len(lines[j]) - len(lines[j].lstrip(" ")) == indent):
        j += 1
    block = lines[i:j]
    if rng.random() < 0.5:
        block = [block[0].split(":", 1)[0] + ": " + rng.choice(["1", "0.5", "null", "'x'", "{}", "[]"])]
    # the mapping the key belongs to: from its first sibling to its last; insert the copy at a random sibling boundary
    start = i
    while start > 0 and (len(lines[start - 1]) - len(lines[start - 1].lstrip(" ")) >= indent or not lines[start - 1].strip()):
        start -= 1
    end = j
    while end < len(lines) and len(lines[end]) - len(lines[end].lstrip(" ")) >= indent:
        end += 1
    sibling_starts = [k for k, ind, _ in key_lines(lines) if start <= k < end and ind == indent] + [end]
    at = rng.choice([s for s in sibling_starts if s <= i or s >= j])
    new = lines[:at] + block + lines[at:]
    copy_line = at + 1
    first_line = i + 1 + (len(block) if at <= i else 0)
    return "\n".join(new) + "\n", key, min(copy_line, first_line), max(copy_line, first_line)


N_YAML = 150


def test_duplicate_key_anywhere_in_params_is_one_line_naming_key_and_line(tmp_path):
    project = make_project(tmp_path / "p")
    text = full_params_yaml()
    rng = random.Random(0)
    keys_hit = set()
    for case in range(N_YAML):
        bad, key, first, second = duplicate_a_key(text, rng)
        path = project / f"params-{case}.yaml"
        path.write_text(bad)
        with pytest.raises(PipelineError) as e:
            load_params(path)
        msg = str(e.value)
        assert_one_line(msg, str(path), f"line {second}", f"duplicate key {key!r}", f"first at line {first}")
        keys_hit.add(key)
    assert len(keys_hit) >= 40  # spread over many sections and depths, not one key


def test_second_section_or_categories_list_via_cli_writes_nothing(tmp_path):
    """The two examples of the issue, through the CLI: exit 2, one line, nothing written."""
    project = make_project(tmp_path / "p")
    base = (project / "params.yaml").read_text()
    cases = [
        (base + "raw_cots:\n  n_samples: 3\n", "raw_cots"),
        (base + "categories: [violence]\n", "categories"),
        (base.replace("raw_cots:\n", "raw_cots:\n  shard_size: 3\n", 1), "shard_size"),
    ]
    for text, key in cases:
        (project / "params.yaml").write_text(text)
        before = snapshot(project)
        refused(run_cli("spec_chunks", "--category", "violence", project=project), "params.yaml", f"duplicate key {key!r}")
        assert snapshot(project) == before


def random_json_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 2 and r < 0.25:
        return {f"k{rng.randint(0, 9)}": random_json_value(rng, depth + 1) for _ in range(rng.randint(1, 3))}
    if depth < 2 and r < 0.35:
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(["text", 3, 0.5, None, True, "", "a,b"])


def with_duplicate(obj: dict, rng: random.Random) -> tuple:
    """JSON text of `obj` with one key of some nested object given twice; returns (text, key)."""
    objects = []

    def walk(v):
        if isinstance(v, dict):
            objects.append(v)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(obj)
    target = rng.choice([o for o in objects if o])
    key = rng.choice(list(target))
    target["__DUP__"] = random_json_value(rng)
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    return text.replace('"__DUP__"', json.dumps(key), 1), key


N_JSONL = 150


def test_duplicate_key_in_any_jsonl_object_is_an_error_naming_the_line(tmp_path):
    rng = random.Random(1)
    for case in range(N_JSONL):
        rows = [{"id": f"x-{i}", "prompt": "p", "expected": "refuse", "policy": "V.2",
                 **({"extra": random_json_value(rng)} if rng.random() < 0.6 else {})} for i in range(rng.randint(1, 6))]
        lines = [json.dumps(r) for r in rows]
        bad = rng.randrange(len(rows))
        lines[bad], key = with_duplicate(rows[bad], rng)
        path = tmp_path / f"d-{case}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(PipelineError) as e:
            list(iter_jsonl(path))
        assert_one_line(str(e.value), f"{path}:{bad + 1}:", "duplicate key", repr(key))


def test_duplicate_key_in_a_prompt_row_stops_the_stage(tmp_path):
    project = make_project(tmp_path / "p")
    run_cli("spec_chunks", "--category", "violence", project=project)
    prompts = project / "data/prompts/violence.jsonl"
    lines = prompts.read_text().splitlines()
    lines[2] = lines[2].rstrip("}") + ', "expected": "comply"}'
    prompts.write_text("\n".join(lines) + "\n")
    before = snapshot(project)
    refused(run_cli("raw_cots", "--category", "violence", project=project),
            "data/prompts/violence.jsonl:3:", "duplicate key 'expected'")
    assert snapshot(project) == before
