"""The worked examples quoted in the spec's '## Cases' sections. The generator sees them in spec(category), so
evaluation and gold-set prompts must not reuse them (the overlap tests use this)."""
from __future__ import annotations

import re

from conftest import ROOT


def spec_cases() -> dict:
    cases = {}
    for path in sorted((ROOT / "data" / "spec" / "categories").glob("*.md")):
        for n, m in enumerate(re.finditer(r'^- "(.+?)" ->', path.read_text(encoding="utf-8"), re.M), 1):
            cases[f"{path.name}:case{n}"] = m.group(1)
    return cases
