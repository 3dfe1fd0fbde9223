"""Class 6 of issue 21: spec headers that almost match `## V.3 <title>`.

Promise: a line a reader would take for a policy header but that is not exactly one (lower-case prefix, no dot,
another separator, no space after '##', extra spaces or tabs, one or three '#', leading blanks, a colon after the
id, no title, full-width letters or digits) fails the spec with one line naming file:line; exit 2; nothing written.
Before, it was silently merged into the previous policy or dropped, and the error surfaced later in the prompts.
"""
from __future__ import annotations

import random

import pytest

from pipelines.errors import PipelineError
from pipelines.spec import parse_category
from test_hostile_common import ROOT, make_project, refused, run_cli, snapshot

VIOLENCE = (ROOT / "data/spec/categories/violence.md").read_text()
FULLWIDTH_DIGITS = str.maketrans("0123456789", "０１２３４５６７８９")


def near_miss(n: int, rng: random.Random) -> str:
    """A header for policy V.<n> damaged by one to three random edits, never the exact valid form."""
    hashes, sep_after, prefix, dot, num, sep_before_title, title = "##", " ", "V", ".", str(n), " ", "Gadget rule"
    edits = rng.sample(range(11), rng.randint(1, 3))
    for e in edits:
        if e == 0:
            prefix = rng.choice(["v", "Vv", "VI" if rng.random() < 0.5 else "vi"]) if rng.random() < 0.5 else "v"
        elif e == 1:
            dot = rng.choice(["", "-", "_", ":", ",", " ", "·", "/", ". "])
        elif e == 2:
            sep_after = rng.choice(["", "  ", "\t", "   "])
        elif e == 3:
            hashes = rng.choice(["#", "###", "####"])
        elif e == 4:
            hashes = rng.choice([" ", "  ", "\t"]) + hashes
        elif e == 5:
            num = num + rng.choice([":", ".", ")", ".1"])
        elif e == 6:
            sep_before_title, title = "", ""
        elif e == 7:
            num = num.translate(FULLWIDTH_DIGITS)
        elif e == 8:
            prefix = "Ｖ"
        elif e == 9:
            sep_before_title = rng.choice(["  ", "\t"])
        elif e == 10:
            hashes = "＃＃"
    line = f"{hashes}{sep_after}{prefix}{dot}{num}{sep_before_title}{title}"
    if line == f"## V.{n} Gadget rule":  # the edits cancelled out
        line = f"## V{n} Gadget rule"
    return line


def with_policy(header: str, rng: random.Random):
    """violence.md with one more policy under `header`, at a random section boundary; (text, header line number)."""
    lines = VIOLENCE.split("\n")
    boundaries = [i for i, ln in enumerate(lines) if ln.startswith("## ")] + [len(lines)]
    at = rng.choice(boundaries)
    block = [header, "Style: hard_refusal", "Refuse to design weapons.", ""]
    new = lines[:at] + block + lines[at:]
    return "\n".join(new), at + 1


N_NEAR_MISSES = 200


def test_near_miss_headers_fail_naming_file_and_line():
    rng = random.Random(0)
    seen = set()
    for case in range(N_NEAR_MISSES):
        header = near_miss(rng.randint(10, 99), rng)
        seen.add(header)
        text, line_no = with_policy(header, rng)
        with pytest.raises(PipelineError) as e:
            parse_category("violence", text, "violence.md")
        msg = str(e.value)
        assert msg.startswith(f"violence.md:{line_no}: ") and "\n" not in msg, (header, msg)
    assert len(seen) >= 120  # distinct headers, not one example repeated


def test_exact_headers_still_parse():
    rng = random.Random(1)
    for case in range(50):
        n = rng.randint(10, 99)  # violence.md has V.1-V.4
        title = rng.choice(["Gadget rule", "A", "Long title, with: punctuation (and more)", "Ünïcode title"])
        text, _ = with_policy(f"## V.{n} {title}", rng)
        cat = parse_category("violence", text, "violence.md")
        assert f"V.{n}" in [p.id for p in cat.policies]
    # free sections and body lines that merely start with '#' are not policy headers
    for free in ("## Cases", "## Examples 2", "#1 rule of thumb", "### Notes", "## FAQ"):
        text, _ = with_policy(free, rng)
        parse_category("violence", text, "violence.md")


def test_near_miss_through_the_cli_writes_nothing(tmp_path):
    rng = random.Random(2)
    for case in range(3):
        project = make_project(tmp_path / f"p{case}")
        text, line_no = with_policy(near_miss(17, rng), rng)
        (project / "data/spec/categories/violence.md").write_text(text)
        before = snapshot(project)
        refused(run_cli("spec_chunks", "--category", "violence", project=project),
                f"data/spec/categories/violence.md:{line_no}:")
        assert snapshot(project) == before
