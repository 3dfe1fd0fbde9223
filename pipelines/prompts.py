"""Training prompts: data/prompts/<category>.jsonl, one {"id", "prompt", "expected", "policy"} object per line.

File order matters: stages take the first `max_prompts_per_category` rows (raw_cots, rl_checkpoint; 14 in params.yaml,
the default set) and the full profile (configs/profiles/full.yaml) all of them, so new rows go at the end. The
prompts must stay apart from every evaluation set (tests/test_training_prompts.py checks the text)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .errors import PipelineError
from .io import check_fields, iter_jsonl
from .spec import STYLES_FOR_EXPECTED, Spec

REQUIRED = ("id", "prompt", "expected", "policy")
OPTIONAL = ("category", "type", "note")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    category: str
    prompt: str
    expected: str  # refuse | safe_complete | comply
    policy: str  # the policy id that applies, e.g. "V.2"

    def to_dict(self) -> dict:
        return asdict(self)


def load_prompts(path: str | Path, spec: Spec, category: Optional[str] = None) -> List[PromptRecord]:
    """Load and validate one prompts file; `category` defaults to the file name. Errors name file and line."""
    path = Path(path)
    category = category or path.stem
    if category not in spec.categories:
        raise PipelineError(f"{path}: unknown category {category!r} (not in params.yaml categories)")
    out: List[PromptRecord] = []
    seen: Dict[str, int] = {}
    for n, row in iter_jsonl(path, f"prompts file for category '{category}'"):
        where = f"{path}:{n}"
        check_fields(where, row, REQUIRED, OPTIONAL)
        if not all(isinstance(row[k], str) for k in REQUIRED):
            raise PipelineError(f"{where}: fields {', '.join(REQUIRED)} must be strings")
        if row.get("category", category) != category:
            raise PipelineError(f"{where}: category {row['category']!r} does not match file category {category!r}")
        pid = row["id"].strip()
        if not pid:
            raise PipelineError(f"{where}: blank id")
        if pid in seen:
            raise PipelineError(f"{where}: duplicate id {pid!r} (first at line {seen[pid]})")
        seen[pid] = n
        if not row["prompt"].strip():
            raise PipelineError(f"{where}: blank prompt (id {pid})")
        if row["expected"] not in STYLES_FOR_EXPECTED:
            raise PipelineError(f"{where}: unknown expected {row['expected']!r} (one of {', '.join(STYLES_FOR_EXPECTED)})")
        policy_ids = {p.id: p for p in spec.categories[category].policies}
        if row["policy"] not in policy_ids:
            raise PipelineError(f"{where}: policy {row['policy']!r} is not a policy of category '{category}'")
        style = policy_ids[row["policy"]].style
        if style not in STYLES_FOR_EXPECTED[row["expected"]]:
            raise PipelineError(
                f"{where}: expected {row['expected']!r} contradicts policy {row['policy']} (style {style})"
            )
        out.append(PromptRecord(pid, category, row["prompt"].strip(), row["expected"], row["policy"]))
    if not out:
        raise PipelineError(f"{path}: no prompts")
    return out
