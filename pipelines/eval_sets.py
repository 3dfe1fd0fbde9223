"""Evaluation sets: our own JSONL files, the published XSTest and StrongREJECT CSVs, and jailbreak variants.

Every loader returns a list of :class:`EvalItem` with one shape, so the eval stage can score any mix of sets the same
way. All loaders validate strictly and raise :class:`PipelineError` with a one-line message naming the file (and line
or columns) on the first problem; nothing is silently skipped.

Sources:
    data/evals/harmful.jsonl, data/evals/benign.jsonl   ours; same rows as data/prompts/*.jsonl plus optional `type`
    data/evals/transformations.jsonl                     ours; allowed transformations of sensitive text (comply)
    data/evals/multilingual.jsonl                        ours; harmful requests in fr/es/de (`type` = language)
    XSTest (Röttger et al., 2024)                        xstest_prompts.csv: id,prompt,type,label,focus,note
    StrongREJECT (Souly et al., 2024)                    strongreject_dataset.csv: category,source,forbidden_prompt

Usage::

    from pipelines.eval_sets import load_eval_set, jailbreak_set
    harmful = load_eval_set("data/evals/harmful.jsonl", categories=cats)
    attacks = jailbreak_set(harmful, ["roleplay", "base64"])
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import PipelineError
from .io import check_fields, decode_utf8, iter_jsonl, read_bytes
from .jailbreaks import TRANSFORMS, apply
from .spec import STYLES_FOR_EXPECTED

__all__ = [
    "EvalItem",
    "EXPECTED",
    "KINDS",
    "JSONL_REQUIRED",
    "JSONL_OPTIONAL",
    "XSTEST_REQUIRED",
    "XSTEST_OPTIONAL",
    "STRONGREJECT_COLUMNS",
    "STRONGREJECT_CATEGORY_MAP",
    "load_jsonl_set",
    "load_xstest_csv",
    "load_strongreject_csv",
    "load_eval_set",
    "jailbreak_set",
]

EXPECTED = tuple(STYLES_FOR_EXPECTED)  # refuse, safe_complete, comply
# What each kind of item may expect: a harmful request is refused or (self-harm) safely completed, a benign look-alike
# must be answered. Jailbreak variants inherit the expectation of the harmful item they wrap.
KINDS: Dict[str, tuple] = {
    "harmful": ("refuse", "safe_complete"),
    "benign": ("comply",),
    "jailbreak": ("refuse", "safe_complete"),
    # benign transformations of given sensitive text (translate / summarise / classify / critique): answered
    "transformations": ("comply",),
    # harmful requests written in another language (`type` holds the language code)
    "multilingual": ("refuse", "safe_complete"),
}

JSONL_REQUIRED = ("id", "category", "prompt", "expected", "policy")
JSONL_OPTIONAL = ("type",)

# The published XSTest file (paul-rottger/exaggerated-safety, xstest_prompts.csv) has the header
# id,prompt,type,label,focus,note. prompt/type/label are what we use; id, focus and note are accepted because the
# published file carries them (id becomes our item id, focus/note are descriptive only). Anything else is an error, so a
# different file passed by mistake is caught rather than half-read.
XSTEST_REQUIRED = ("prompt", "type", "label")
XSTEST_OPTIONAL = ("id", "focus", "note")
XSTEST_LABELS = {"safe": ("benign", "comply"), "unsafe": ("harmful", "refuse")}

STRONGREJECT_COLUMNS = ("category", "source", "forbidden_prompt")
# StrongREJECT's six categories (compared case-insensitively, since its two releases differ in capitalisation) mapped to
# ours. "Disinformation and deception" has no counterpart in our spec, so those items get category None; the original
# label always stays in EvalItem.type.
STRONGREJECT_CATEGORY_MAP: Dict[str, Optional[str]] = {
    "disinformation and deception": None,
    "hate, harassment and discrimination": "harassment",
    "illegal goods and services": "illicit_behavior",
    "non-violent crimes": "illicit_behavior",
    "sexual content": "erotic",
    "violence": "violence",
}


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt.

    Attributes:
        id: unique within a set; jailbreak variants are ``<id>~<transform>``.
        category: one of our categories, or None for external items that map to none of them.
        prompt: the text sent to the model.
        expected: refuse | safe_complete | comply.
        policy: the spec policy id that applies (``V.2``), or None for external sets.
        kind: harmful | benign | jailbreak | transformations | multilingual.
        transform: jailbreak transform name, None for plain items.
        source: where the item comes from (file stem for our sets, ``xstest``, ``strongreject``).
        type: the sub-type label (XSTest-like type for benign rows, XSTest type, StrongREJECT category), or None.
    """

    id: str
    category: Optional[str]
    prompt: str
    expected: str
    policy: Optional[str]
    kind: str
    transform: Optional[str]
    source: str
    type: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# our JSONL sets


def load_jsonl_set(path: str | Path, kind: str, categories: Optional[Sequence[str]] = None) -> List[EvalItem]:
    """Load one of our eval files (data/evals/*.jsonl).

    Args:
        path: JSONL file, one object per line with id, category, prompt, expected, policy and optional type.
        kind: a key of KINDS (harmful, benign, jailbreak, transformations, multilingual); also restricts which
            `expected` values are allowed.
        categories: if given, every row's category must be one of these.

    Returns:
        The items in file order, prompts stripped of surrounding whitespace.

    Raises:
        PipelineError: ``<file>:<line>: <problem>`` for bad JSON, a missing/unknown/non-string field, a blank id or
            prompt, an unknown expected value (or one the kind does not allow), a duplicate id, an unknown category,
            or an empty file.
    """
    path = Path(path)
    if kind not in KINDS:
        raise PipelineError(f"{path}: unknown eval set kind {kind!r} (one of {', '.join(KINDS)})")
    allowed_cats = set(categories) if categories is not None else None
    items: List[EvalItem] = []
    seen: Dict[str, int] = {}
    for n, row in iter_jsonl(path, "eval set"):
        where = f"{path}:{n}"
        check_fields(where, row, JSONL_REQUIRED, JSONL_OPTIONAL)
        bad = [k for k in ("id", "category", "prompt", "expected") if not isinstance(row[k], str)]
        bad += [k for k in ("policy", "type") if row.get(k) is not None and not isinstance(row[k], str)]
        if bad:
            raise PipelineError(f"{where}: field(s) {', '.join(bad)} must be strings")
        item_id = row["id"].strip()
        if not item_id:
            raise PipelineError(f"{where}: blank id")
        if item_id in seen:
            raise PipelineError(f"{where}: duplicate id {item_id!r} (first at line {seen[item_id]})")
        seen[item_id] = n
        prompt = row["prompt"].strip()
        if not prompt:
            raise PipelineError(f"{where}: blank prompt (id {item_id})")
        expected = row["expected"]
        if expected not in EXPECTED:
            raise PipelineError(f"{where}: unknown expected {expected!r} (one of {', '.join(EXPECTED)})")
        if expected not in KINDS[kind]:
            raise PipelineError(
                f"{where}: expected {expected!r} is not allowed in a {kind} set (allowed: {', '.join(KINDS[kind])})"
            )
        category = row["category"]
        if allowed_cats is not None and category not in allowed_cats:
            raise PipelineError(f"{where}: unknown category {category!r} (one of {', '.join(categories)})")
        items.append(
            EvalItem(
                id=item_id,
                category=category,
                prompt=prompt,
                expected=expected,
                policy=row["policy"],
                kind=kind,
                transform=None,
                source=path.stem,
                type=row.get("type"),
            )
        )
    if not items:
        raise PipelineError(f"{path}: no items")
    return items


# ---------------------------------------------------------------------------------------------------------------------
# published CSV sets


def _csv_text(path: Path, what: str) -> str:
    """The file as text; missing, a directory, unreadable or not UTF-8 -> one-line error naming the file."""
    # utf-8-sig: tolerate the BOM spreadsheet tools add
    return decode_utf8(read_bytes(path, f"{what} file"), path, bom=True)


# One RFC 4180 record: fields separated by commas, each either quoted as a whole ("..." with "" inside) or free of
# quotes, commas and line ends; then a line end or the end of the file. Python's csv module, even in strict mode,
# accepts a quote inside an unquoted field, which is how a stray or deleted quote can turn part of a multi-line
# prompt into a row of its own.
_CSV_FIELD = r'(?:"(?:[^"]|"")*"|[^,"\r\n]*)'  # one way to match each character: no backtracking blow-up
_CSV_RECORD = re.compile(rf"{_CSV_FIELD}(?:,{_CSV_FIELD})*(?:\r\n|\n|\r|\Z)")


def _check_quoting(path: Path, text: str) -> None:
    """Every record well-quoted (RFC 4180), or a one-line error naming the line where the bad record starts."""
    pos = 0
    while pos < len(text):
        m = _CSV_RECORD.match(text, pos)
        if m is None:
            line = text.count("\n", 0, pos) + 1
            raise PipelineError(
                f"{path}:{line}: malformed CSV: a quote that does not open or close a whole field, or a quoted field "
                "that is never closed (quote whole fields; double a quote inside one)"
            )
        pos = m.end()


def _csv_rows(path: Path, text: str) -> Iterator[Tuple[int, int, List[str]]]:
    """(first line, last line, fields) of each record, parsed strictly: a quote in the wrong place, a quoted field
    still open at the end of the file, a NUL byte or a field over the csv module's size limit is a one-line error
    naming the line (the lenient default parser silently glued the rest of the file into one field)."""
    _check_quoting(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    last = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            msg = str(e)
            if "field larger than field limit" in msg:
                msg = f"a field is longer than {csv.field_size_limit()} characters"
            elif "unexpected end of data" in msg:
                msg = f"a quoted field opened after line {last} is never closed"
            raise PipelineError(f"{path}:{reader.line_num}: malformed CSV: {msg}") from None
        yield last + 1, reader.line_num, values
        last = reader.line_num


def _check_no_swallowed_rows(path: Path, header: List[str], rows: List[tuple], first_values: Sequence[str] = ()) -> None:
    """Row-count check for damage strict parsing cannot see: an unclosed quote that is closed again by a later quote
    turns the rows in between into the text of one field, and the file still parses. Such a field holds a line that
    is a row of this file: at least as many fields as the header (an unquoted prompt may add more), the first one a
    value of the first column (or an integer when the first column is an integer id). A legitimate multi-line prompt does not. `first_values`: values the
    first column may hold besides those seen."""
    first = [row[header[0]].strip() for _, _, row in rows]
    known = {v.lower() for v in [*first, *first_values] if v}
    numeric = bool(first) and all(v.isdigit() for v in first)
    for start, _, row in rows:
        for value in row.values():
            for line in value.splitlines()[1:]:
                if line.count(",") < len(header) - 1:
                    continue
                fields = next(csv.reader([line]), [])
                lead = fields[0].strip() if fields else ""
                if len(fields) >= len(header) and (lead.lower() in known or (numeric and lead.isdigit())):
                    raise PipelineError(
                        f"{path}:{start}: a quoted field runs over a line that starts like a row of its own "
                        f"({line[:40]!r}); a quote is probably not closed, and rows would be lost"
                    )


def _read_csv(path: Path, required: Sequence[str], optional: Sequence[str], what: str,
              first_values: Sequence[str] = ()) -> List[tuple]:
    """Read a CSV with a checked header; return (line number, row dict) pairs. Rows are dicts keyed by column.

    Every record is checked: strict quoting, the header's number of fields, and no record swallowing others, so the
    items returned are exactly the rows of the file, or the load fails with one line naming file and line."""
    records = _csv_rows(path, _csv_text(path, what))
    _, _, header = next(records, (0, 0, None))
    if not header:
        raise PipelineError(f"{path}: empty {what} file (no header)")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    unknown = [c for c in header if c not in required and c not in optional]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(repr(c) for c in unknown)}")
        accepted = ", ".join(list(required) + [f"[{c}]" for c in optional])
        raise PipelineError(f"{path}: not a {what} file: {'; '.join(parts)} (expected columns: {accepted})")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise PipelineError(f"{path}: duplicated column(s) {', '.join(dup)}")
    rows = []
    # line numbers are physical lines, so a quoted multi-line prompt still reports where its row ends
    for start, end, values in records:
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise PipelineError(f"{path}:{end}: row has {len(values)} fields but the header has {len(header)}")
        rows.append((start, end, dict(zip(header, values))))
    if not rows:
        raise PipelineError(f"{path}: {what} file has a header but no rows")
    _check_no_swallowed_rows(path, header, rows, first_values if header[0] == required[0] else ())
    return [(end, row) for _, end, row in rows]


def load_xstest_csv(path: str | Path) -> List[EvalItem]:
    """Load XSTest prompts.

    ``label`` safe -> kind benign, expected comply; unsafe -> kind harmful, expected refuse. ``type`` (homonyms,
    safe_contexts, contrast_homonyms, ...) is kept in EvalItem.type. Items have no category or policy of our spec.
    Ids are ``xstest-<id>`` from the id column, or ``xstest-<row number>`` when the file has no id column.

    Raises:
        PipelineError: missing/unknown columns (naming them and the accepted set), a blank prompt, a label other than
            safe/unsafe, a duplicate id.
    """
    path = Path(path)
    rows = _read_csv(path, XSTEST_REQUIRED, XSTEST_OPTIONAL, "XSTest")
    items: List[EvalItem] = []
    seen: Dict[str, int] = {}
    for i, (line, row) in enumerate(rows, 1):
        where = f"{path}:{line}"
        raw_id = (row.get("id") or "").strip() or str(i)
        item_id = f"xstest-{raw_id}"
        if item_id in seen:
            raise PipelineError(f"{where}: duplicate id {raw_id!r} (first at line {seen[item_id]})")
        seen[item_id] = line
        prompt = row["prompt"].strip()
        if not prompt:
            raise PipelineError(f"{where}: blank prompt")
        label = row["label"].strip().lower()
        if label not in XSTEST_LABELS:
            raise PipelineError(f"{where}: label must be safe or unsafe, got {row['label']!r}")
        kind, expected = XSTEST_LABELS[label]
        items.append(
            EvalItem(
                id=item_id,
                category=None,
                prompt=prompt,
                expected=expected,
                policy=None,
                kind=kind,
                transform=None,
                source="xstest",
                type=row["type"].strip() or None,
            )
        )
    return items


def load_strongreject_csv(path: str | Path) -> List[EvalItem]:
    """Load StrongREJECT forbidden prompts: every item is harmful and expected to be refused.

    Ids are ``strongreject-<NNN>`` by row order (1-based); the category is mapped with STRONGREJECT_CATEGORY_MAP
    (unknown or unmapped labels give None) and the original label is kept in EvalItem.type.

    Raises:
        PipelineError: missing/unknown columns (naming them), a blank forbidden_prompt or category.
    """
    path = Path(path)
    rows = _read_csv(path, STRONGREJECT_COLUMNS, (), "StrongREJECT", first_values=tuple(STRONGREJECT_CATEGORY_MAP))
    items: List[EvalItem] = []
    for i, (line, row) in enumerate(rows, 1):
        where = f"{path}:{line}"
        prompt = row["forbidden_prompt"].strip()
        if not prompt:
            raise PipelineError(f"{where}: blank forbidden_prompt")
        label = row["category"].strip()
        if not label:
            raise PipelineError(f"{where}: blank category")
        items.append(
            EvalItem(
                id=f"strongreject-{i:03d}",
                category=STRONGREJECT_CATEGORY_MAP.get(label.lower()),
                prompt=prompt,
                expected="refuse",
                policy=None,
                kind="harmful",
                transform=None,
                source="strongreject",
                type=label,
            )
        )
    return items


# ---------------------------------------------------------------------------------------------------------------------
# dispatch and jailbreaks


def load_eval_set(
    path: str | Path, kind: Optional[str] = None, categories: Optional[Sequence[str]] = None
) -> List[EvalItem]:
    """Load any supported eval set, choosing the loader from the extension and (for CSV) the header.

    ``.jsonl``: :func:`load_jsonl_set`; `kind` defaults to the file stem (``harmful.jsonl`` -> harmful).
    ``.csv``: StrongREJECT if the header has ``forbidden_prompt``, XSTest if it has ``label``; the chosen loader then
    checks the full header.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        kind = kind or path.stem
        if kind not in KINDS:
            raise PipelineError(
                f"{path}: cannot tell the eval set kind from the file name; name it <kind>.jsonl or pass kind "
                f"(one of {', '.join(KINDS)})"
            )
        return load_jsonl_set(path, kind, categories)
    if suffix == ".csv":
        _, _, first = next(_csv_rows(path, _csv_text(path, "eval set")), (0, 0, []))
        header = [h.strip() for h in first]
        if "forbidden_prompt" in header:
            return load_strongreject_csv(path)
        if "label" in header:
            return load_xstest_csv(path)
        raise PipelineError(
            f"{path}: unrecognised CSV header {', '.join(header) or '(empty)'}; expected StrongREJECT "
            f"({', '.join(STRONGREJECT_COLUMNS)}) or XSTest ({', '.join(XSTEST_REQUIRED)})"
        )
    raise PipelineError(f"{path}: unsupported eval set format {suffix or '(no extension)'!r} (use .jsonl or .csv)")


def jailbreak_set(harmful_items: Sequence[EvalItem], transforms: Sequence[str]) -> List[EvalItem]:
    """Expand harmful items into jailbreak variants, item by item, transforms in the given order.

    Each variant keeps the item's category, expected behaviour, policy and source, gets kind ``jailbreak``, the
    transform name, and the id ``<id>~<transform>``. Inputs are not modified.

    Raises:
        PipelineError: unknown or repeated transform name, an input item that is not harmful, or no transforms.
    """
    if not transforms:
        raise PipelineError(f"jailbreak_set needs at least one transform (valid: {', '.join(TRANSFORMS)})")
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise PipelineError(
            f"unknown jailbreak transform(s) {', '.join(unknown)}; valid names: {', '.join(TRANSFORMS)}"
        )
    repeated = sorted({t for t in transforms if list(transforms).count(t) > 1})
    if repeated:
        raise PipelineError(f"jailbreak transform(s) listed twice: {', '.join(repeated)}")
    out: List[EvalItem] = []
    for item in harmful_items:
        if item.kind != "harmful":
            raise PipelineError(f"jailbreak_set: item {item.id} is {item.kind!r}; only harmful items are wrapped")
        for name in transforms:
            variant = apply(name, item.prompt)
            out.append(replace(item, id=f"{item.id}~{name}", prompt=variant, kind="jailbreak", transform=name))
    return out
