"""Class 1 of issue 21: line separators other than "\\n", and lone surrogates, in JSONL.

Promise: a JSONL file we write is read back equal, whatever the text holds (U+2028, U+2029, U+0085, \\x0b, \\x0c,
\\x1c-\\x1e, \\r, BOM, NUL, astral characters); it is one "\\n"-terminated line per record for any line-splitting reader;
a lone surrogate (not text) is written as U+FFFD. A human-edited JSONL with a lone surrogate escape is refused with
one line naming file:line. A stage whose prompts hold such characters runs, and reruns from its own shards.
"""
from __future__ import annotations

import json
import random

import pytest

from pipelines.errors import PipelineError
from pipelines.io import iter_jsonl, read_jsonl, write_jsonl
from test_hostile_common import assert_one_line, make_project, minimal_params, run_cli, snapshot

SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\r\n", "\n", "\t", "\ufeff",
              "\x00", "\u200b"]
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d"]
WORDS = ["alpha", "beta", "how", "do I", "kill", "a process", "é", "日本", "\U0001F600", "\\", '"', "{", "}", "[]", ","]


def random_text(rng: random.Random, surrogates: bool = True) -> str:
    parts = []
    for _ in range(rng.randint(0, 12)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(SEPARATORS))
        elif r < 0.45 and surrogates:
            parts.append(rng.choice(SURROGATES))
        else:
            parts.append(rng.choice(WORDS))
    return "".join(parts)


def random_row(rng: random.Random, surrogates: bool = True) -> dict:
    row = {"id": f"r{rng.randint(0, 10**6)}", "prompt": random_text(rng, surrogates),
           "cot": random_text(rng, surrogates), "n": rng.randint(-5, 5)}
    if rng.random() < 0.4:
        row["nested"] = {random_text(rng, surrogates) or "k": [random_text(rng, surrogates), {"x": random_text(rng, surrogates)}]}
    return row


def as_written(value):
    """What a lone surrogate becomes on output (U+FFFD); everything else unchanged."""
    if isinstance(value, str):
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, dict):
        return {as_written(k): as_written(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_written(v) for v in value]
    return value


N_ROUND_TRIP_FILES = 60  # x 1..8 rows each


def test_written_jsonl_reads_back_equal_whatever_the_text(tmp_path):
    rng = random.Random(0)
    rows_tried = 0
    for case in range(N_ROUND_TRIP_FILES):
        rows = [random_row(rng) for _ in range(rng.randint(1, 8))]
        rows_tried += len(rows)
        path = tmp_path / f"shard-{case}.jsonl"
        write_jsonl(path, rows)
        assert read_jsonl(path) == [as_written(r) for r in rows]
        text = path.read_bytes().decode("utf-8")  # always valid UTF-8
        # one record per line for ANY line splitter (str.splitlines, editors, jq), not only ours
        assert len(text.splitlines()) == len(rows), repr(text)
        assert [json.loads(line) for line in text.splitlines()] == [as_written(r) for r in rows]
    assert rows_tried >= 200


N_HUMAN_FILES = 60


def test_human_jsonl_with_raw_separators_in_strings_keeps_line_numbers(tmp_path):
    """JSON allows U+2028, U+0085, ... raw inside strings: such a record is one line, and errors name the editor's
    line number (lines are "\\n"-separated only)."""
    rng = random.Random(1)
    for case in range(N_HUMAN_FILES):
        rows = [random_row(rng, surrogates=False) for _ in range(rng.randint(2, 8))]
        # raw (not escaped) separators inside the strings, as a hand-edited file may have them; \n, \r and control
        # characters below 0x20 must be escaped in JSON, so only the others are raw
        lines = [json.dumps(r, ensure_ascii=False).replace("\\u2028", "\u2028") for r in rows]
        path = tmp_path / f"human-{case}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
        got = list(iter_jsonl(path))
        assert [r for _, r in got] == rows
        assert [n for n, _ in got] == list(range(1, len(rows) + 1))
        bad = rng.randrange(len(lines))
        lines[bad] = lines[bad][:-1]  # cut the closing brace of one record
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
        with pytest.raises(PipelineError) as e:
            list(iter_jsonl(path))
        assert_one_line(str(e.value), f"{path}:{bad + 1}:", "invalid JSON")


N_SURROGATE_FILES = 80


def test_lone_surrogate_escape_in_input_is_a_one_line_error_naming_the_line(tmp_path):
    rng = random.Random(2)
    for case in range(N_SURROGATE_FILES):
        rows = [random_row(rng, surrogates=False) for _ in range(rng.randint(1, 6))]
        lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rows]
        bad = rng.randrange(len(lines))
        escape = "\\u%04x" % rng.choice([0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xD83D])
        where = rng.choice(["prompt", "key"])
        row = dict(rows[bad])
        if where == "prompt":
            row["prompt"] = "PLACEHOLDER"
            lines[bad] = json.dumps(row).replace("PLACEHOLDER", "ab" + escape + "cd")
        else:
            row["PLACEHOLDER"] = 1
            lines[bad] = json.dumps(row).replace("PLACEHOLDER", escape)
        path = tmp_path / f"s-{case}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(PipelineError) as e:
            list(iter_jsonl(path))
        assert_one_line(str(e.value), f"{path}:{bad + 1}:", "surrogate")
    # a valid escaped pair is one astral character, not an error
    ok = tmp_path / "pair.jsonl"
    ok.write_text('{"p": "\\ud83d\\ude00"}\n')
    assert read_jsonl(ok) == [{"p": "\U0001F600"}]


N_STAGE_RUNS = 4


def test_stage_runs_and_resumes_with_separators_in_prompts(tmp_path):
    """raw_cots with prompts holding raw separators: the stage writes its shards, reads them back, and a rerun
    (out removed, shards kept) resumes from them. Before the fix every run failed on its own shard."""
    rng = random.Random(3)
    for case in range(N_STAGE_RUNS):
        project = make_project(tmp_path / f"p{case}", minimal_params())
        prompts = project / "data/prompts/violence.jsonl"
        rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
        for row in rows[:4]:
            seps = "".join(rng.choice(SEPARATORS[:9]) for _ in range(3))
            row["prompt"] = row["prompt"][:30] + seps + row["prompt"][30:]
        prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        assert run_cli("spec_chunks", "--category", "violence", project=project).code == 0
        first = run_cli("raw_cots", "--category", "violence", project=project)
        assert first.code == 0, first
        out = project / "data/raw_cots/violence.jsonl"
        written = read_jsonl(out)
        assert any(any(s in r["prompt"] for s in SEPARATORS[:9]) for r in written)
        out.unlink()
        before = {k: v for k, v in snapshot(project).items() if k.startswith("data/.work")}
        again = run_cli("raw_cots", "--category", "violence", project=project)
        assert again.code == 0, again
        assert read_jsonl(out) == written
        assert {k: v for k, v in snapshot(project).items() if k.startswith("data/.work")} == before  # reused


def test_http_replies_with_separators_and_lone_surrogates_are_kept_as_text(tmp_path, monkeypatch):
    """A server reply is data: separators are kept, a lone surrogate becomes U+FFFD, and what the backend returns
    round-trips through our JSONL writer."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    from pipelines.backends.openai_http import OpenAIChatBackend
    from pipelines.params.common import OpenAIBackend, Sampling
    from tests.stub_openai_server import StubOpenAIServer

    rng = random.Random(4)
    replies = {f"q{i}": random_text(rng).replace(" ", "_") or "x" for i in range(40)}
    with StubOpenAIServer(reply_fn=lambda body: replies[body["messages"][-1]["content"]]) as server:
        cfg = OpenAIBackend(kind="openai", base_url=server.base_url, model="m", max_retries=0, timeout_s=10.0)
        with OpenAIChatBackend(cfg) as backend:
            out = backend.generate([[{"role": "user", "content": q}] for q in replies], n=1, sampling=Sampling(),
                                   progress=False)
    got = [row[0] for row in out]
    assert got == [as_written(r) for r in replies.values()]
    path = tmp_path / "replies.jsonl"
    write_jsonl(path, [{"reply": g} for g in got])
    assert [r["reply"] for r in read_jsonl(path)] == got
