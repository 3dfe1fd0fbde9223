"""The safety spec: parse data/spec/ and build spec(category) = overview + that category's policy + its style guidelines.

Layout (human-edited, git-tracked):
    data/spec/overview.md               all categories in one short list
    data/spec/styles/<style>.md         how a response in that style looks
    data/spec/categories/<name>.md      "# Title (P)" then sections "## P.<n> title" whose body starts "Style: <style>"

Policy ids (`V.2`) are stable: CoT citations, the rubric judge and the policy-retrieval metric all key on them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .errors import PipelineError
from .io import read_text

STYLES = ("hard_refusal", "safe_completion", "compliance_with_disclaimer", "full_compliance")
# Which styles satisfy each expected behaviour label of a prompt.
STYLES_FOR_EXPECTED = {
    "refuse": ("hard_refusal",),
    "safe_complete": ("safe_completion",),
    "comply": ("full_compliance", "compliance_with_disclaimer"),
}

_TITLE = re.compile(r"^# (?P<title>.+?) \((?P<prefix>[A-Z]{1,3})\)\s*$")
_SECTION = re.compile(r"^## (?P<id>[A-Z]{1,3}\.[0-9]+) (?P<title>\S.*)$")
# Anything a reader would take for a policy header: '#'s, a 1-3 letter prefix in any case or script, an optional
# separator, a number in any digits ("## V3 ...", "##V.3 ...", "## v.3 ...", "### V.3", "## V-3:", "## V.３").
# A line like this that is not exactly a _SECTION is an error; before, it became part of the previous policy's text
# (or a free section such as "## Cases"), and the policy was missing without a word.
_NEAR_SECTION = re.compile(r"^\s*[#\uff03]+\s*[^\W\d_]{1,3}\s*[.\u00b7\u3002\uff0e,:;_\-/]?\s*\d")
_STYLE = re.compile(r"^Style:\s*(?P<style>\S+)\s*$")
POLICY_ID = re.compile(r"\b([A-Z]{1,3})\.(\d+)\b")


@dataclass(frozen=True)
class Policy:
    id: str
    title: str
    style: str
    text: str  # body without the heading and Style line


@dataclass(frozen=True)
class Category:
    name: str
    title: str
    prefix: str
    policies: Tuple[Policy, ...]
    text: str  # the whole file, as the model sees it


@dataclass(frozen=True)
class Spec:
    overview: str
    styles: Dict[str, str]
    categories: Dict[str, Category]
    _by_id: Dict[str, Policy] = field(default_factory=dict, repr=False)

    def policy(self, policy_id: str) -> Policy:
        try:
            return self._by_id[policy_id]
        except KeyError:
            raise PipelineError(f"unknown policy id {policy_id!r}") from None

    def category_of(self, policy_id: str) -> str | None:
        prefix = policy_id.split(".")[0]
        return next((c.name for c in self.categories.values() if c.prefix == prefix), None)

    def chunk(self, category: str) -> str:
        """spec(category): the short overview, the full policy of `category`, and the style guidelines it uses."""
        cat = self.categories[category]
        used = [s for s in STYLES if any(p.style == s for p in cat.policies)]
        parts = [self.overview.strip(), cat.text.strip()] + [self.styles[s].strip() for s in used]
        return "\n\n".join(parts) + "\n"


def parse_category(name: str, text: str, source: str) -> Category:
    """Parse one category file; every format problem is a one-line error naming file and line."""
    # "\n" only (after read_text's universal newlines): U+2028 or \x0c inside a policy's text is not a line break
    # for an editor, so it must not start a header here either, and line numbers must be the editor's.
    lines = text.split("\n")
    if not text.strip():
        raise PipelineError(f"{source}: empty policy file")
    m = _TITLE.match(lines[0])
    if not m:
        raise PipelineError(f"{source}:1: first line must be '# <Title> (<PREFIX>)', got {lines[0][:60]!r}")
    prefix = m["prefix"]
    sections: List[Tuple[int, re.Match, List[str]]] = []
    seen: Dict[str, int] = {}
    for n, line in enumerate(lines[1:], 2):
        if _NEAR_SECTION.match(line) and not _SECTION.match(line):
            raise PipelineError(
                f"{source}:{n}: {line.rstrip()[:60]!r} looks like a policy header but is not "
                f"'## {prefix}.<number> <title>' (capital prefix, a dot, the number, one space, the title)"
            )
        if line.startswith("## "):
            sm = _SECTION.match(line)
            if sm:
                pid = sm["id"]
                if not pid.startswith(prefix + "."):
                    raise PipelineError(f"{source}:{n}: policy id {pid} does not start with this category's prefix {prefix}.")
                if pid in seen:
                    raise PipelineError(f"{source}:{n}: duplicated policy id {pid} (first at line {seen[pid]})")
                seen[pid] = n
                sections.append((n, sm, []))
            else:
                sections.append((n, None, []))  # a free section such as "## Cases": no id, not a policy
        elif sections:
            sections[-1][2].append(line)
    policies = []
    for n, sm, body in sections:
        if sm is None:
            continue
        body = [b for b in body]
        first = next((i for i, b in enumerate(body) if b.strip()), None)
        if first is None:
            raise PipelineError(f"{source}:{n}: policy {sm['id']} is empty")
        st = _STYLE.match(body[first].strip())
        if not st:
            raise PipelineError(f"{source}:{n + first + 1}: policy {sm['id']} must start with 'Style: <style>'")
        if st["style"] not in STYLES:
            raise PipelineError(f"{source}:{n + first + 1}: unknown style {st['style']!r} (one of {', '.join(STYLES)})")
        rest = "\n".join(body[first + 1:]).strip()
        if not rest:
            raise PipelineError(f"{source}:{n}: policy {sm['id']} has a style but no text")
        policies.append(Policy(sm["id"], sm["title"].strip(), st["style"], rest))
    if not policies:
        raise PipelineError(f"{source}: no policy sections ('## {prefix}.1 <title>' followed by 'Style: <style>')")
    return Category(name=name, title=m["title"], prefix=prefix, policies=tuple(policies), text=text)


def load_spec(spec_dir: str | Path, categories: Sequence[str]) -> Spec:
    """Load and validate the spec for `categories` (from params.yaml)."""
    spec_dir = Path(spec_dir)
    overview = read_text(spec_dir / "overview.md", "spec overview")
    if not overview.strip():
        raise PipelineError(f"{spec_dir / 'overview.md'}: empty overview")
    cats: Dict[str, Category] = {}
    by_id: Dict[str, Policy] = {}
    prefixes: Dict[str, str] = {}
    for name in categories:
        path = spec_dir / "categories" / f"{name}.md"
        if not path.exists():
            raise PipelineError(f"{path}: policy file for category '{name}' not found")
        cat = parse_category(name, read_text(path), str(path))
        if cat.prefix in prefixes:
            raise PipelineError(f"{path}:1: prefix {cat.prefix} already used by category '{prefixes[cat.prefix]}'")
        prefixes[cat.prefix] = name
        cats[name] = cat
        by_id.update({p.id: p for p in cat.policies})
    styles: Dict[str, str] = {}
    used = {p.style for c in cats.values() for p in c.policies}
    for style in STYLES:
        path = spec_dir / "styles" / f"{style}.md"
        if style in used or path.exists():
            text = read_text(path, f"style guideline '{style}'")
            if not text.strip():
                raise PipelineError(f"{path}: empty style guideline")
            styles[style] = text
    return Spec(overview=overview, styles=styles, categories=cats, _by_id=by_id)
