"""The files users edit, as Dagster assets: found in dvc.yaml's deps, versioned by the md5 DVC gives them.

An input is a dep that no stage produces and that is not code (versions.default_is_code_dep; code goes into the
stage's code version instead). Nothing here lists the DAG, it is all read from the resolved dvc.yaml:

- a foreach stage whose every item depends on the same path with its own key in it (`data/spec/categories/${item}.md`)
  gives one input partitioned like that stage: `spec_categories`, whose partition `violence` is that category's file;
- every other input path that holds no other input path is one unpartitioned input (`data/spec/overview.md`,
  `data/spec/styles`, `data/evals/harmful.jsonl`);
- a path that holds other inputs (`data/spec`, read whole by rl_checkpoint) is no asset of its own: it stands for the
  inputs inside it, and each child on disk that none of them covers (configs/dagster under `configs`) becomes an input,
  so that every file a stage reads belongs to exactly one input partition.

A stage depends on the inputs its items' deps map to, and the (input key, item key) pairs choose the partition mapping
as between stages (translator.partition_mapping): editing violence.md makes only the violence partitions stale. The data
version of an input partition is DVC's md5 of its path (a file: md5 of its bytes; a directory: md5 of DVC's `.dir`
listing), i.e. the md5 dvc.lock records for that dep. Files DVC would skip through a .dvcignore are hashed here all the
same (the project has none). A file added inside a read-whole directory needs a reload of the code location to get its
own input. Dagster is imported only by `input_assets`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from .manifest import DvcManifest, contains, dep_matches_out

KEY = "{key}"  # where the foreach key goes in an input's path pattern
MISSING = "<missing>"  # the data version of an input path that does not exist


@dataclass(frozen=True)
class InputSource:
    """One input asset: a path, or a path pattern with one partition per foreach key of `stage`."""

    name: str  # asset name: `spec_categories`
    pattern: str  # `data/spec/categories/{key}.md`, or a plain path
    keys: Optional[Tuple[str, ...]] = None  # partition keys (the stage's foreach keys); None = unpartitioned
    stage: Optional[str] = None  # the foreach stage whose keys partition it

    def path(self, key: Optional[str] = None) -> str:
        return self.pattern if self.keys is None else self.pattern.replace(KEY, str(key))

    def paths(self) -> Dict[Optional[str], str]:
        """partition key (None when unpartitioned) -> path."""
        return {None: self.pattern} if self.keys is None else {k: self.path(k) for k in self.keys}


@dataclass
class InputCatalog:
    sources: Dict[str, InputSource]  # name -> input, partitioned ones first, then by path
    # stage -> input name -> {(input partition key, item key)}: which item reads which input partition
    edges: Dict[str, Dict[str, Set[Tuple[Optional[str], Optional[str]]]]] = field(default_factory=dict)

    def owners(self) -> Dict[str, Tuple[str, Optional[str]]]:
        """path -> (input name, partition key) for every input partition."""
        return {path: (s.name, k) for s in self.sources.values() for k, path in s.paths().items()}

    def owner_of(self, path: str) -> Optional[Tuple[str, Optional[str]]]:
        """The input partition holding the file `path`, or None when no input does."""
        return next((o for p, o in self.owners().items() if contains(p, path)), None)

    def readers(self, name: str) -> List[str]:
        return [stage for stage, by_input in self.edges.items() if name in by_input]


# ------------------------------------------------------------------------------------------------ hashing
def dvc_md5(root: Path, path: str) -> Optional[str]:
    """The md5 DVC 3 records for `path` as a dep (pipelines.model_card.dvc_md5), or None when it does not exist."""
    from pipelines.model_card import dvc_md5 as digest

    p = Path(root) / path
    return digest(p) if p.is_file() or p.is_dir() else None


def data_version(root: Path, path: str) -> str:
    return dvc_md5(root, path) or MISSING


# ------------------------------------------------------------------------------------------------ discovery
def input_deps(manifest: DvcManifest, is_code: Callable[[Path, str], bool]) -> Dict[str, List[str]]:
    """item -> its deps that no stage produces and that are not code."""
    outs = [o.path for i in manifest.items.values() for o in i.outs]
    return {name: [d for d in item.deps
                   if not is_code(manifest.root, d) and not any(dep_matches_out(d, o) for o in outs)]
            for name, item in manifest.items.items()}


def _patterns(manifest: DvcManifest, deps: Dict[str, List[str]]) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """pattern -> (stage, keys) for each path that every item of a foreach stage reads with its own key in it."""
    found: Dict[str, Tuple[str, Tuple[str, ...]]] = {}
    for stage_name in manifest.stage_order():  # upstream first: the first stage to read a pattern partitions it
        stage = manifest.stages[stage_name]
        if not stage.is_template:
            continue
        for item in stage.items:
            for dep in deps[item.name]:
                # each place the key occurs is a candidate (`data/a.md` for key `a` has three)
                for pattern in _candidates(dep, str(item.key or "")):
                    if pattern in found:
                        break
                    if all(pattern.replace(KEY, str(i.key)) in deps[i.name] for i in stage.items):
                        found[pattern] = (stage_name, tuple(stage.keys or ()))
                        break
    return found


def _candidates(dep: str, key: str) -> List[str]:
    if not key:
        return []
    starts = [i for i in range(len(dep)) if dep.startswith(key, i)]
    return [dep[:i] + KEY + dep[i + len(key):] for i in starts]


def _uncovered(root: Path, path: str, leaves: Set[str]) -> List[str]:
    """Children of the directory `path` (recursively) that no leaf covers: each becomes an input of its own."""
    base = root / path
    if not base.is_dir():
        return []
    out: List[str] = []
    for child in sorted(base.iterdir()):
        rel = child.relative_to(root).as_posix()
        if any(contains(leaf, rel) for leaf in leaves):
            continue
        if any(contains(rel, leaf) for leaf in leaves):
            out += _uncovered(root, rel, leaves)
        else:
            out.append(rel)
    return out


def input_name(pattern: str) -> str:
    """`data/spec/categories/{key}.md` -> spec_categories, `configs/zero2.yaml` -> configs_zero2."""
    parts = [p for p in pattern.split("/") if p]
    if len(parts) > 1 and parts[0] == "data":
        parts = parts[1:]
    words = [re.sub(r"\..*$", "", p.replace(KEY, "")) for p in parts]
    return re.sub(r"\W+", "_", "_".join(w for w in words if w)).strip("_")


def _unique(name: str, pattern: str, taken: Set[str]) -> str:
    if name and name not in taken:
        return name
    full = re.sub(r"\W+", "_", pattern.replace(KEY, "by_key")).strip("_")
    candidate, n = full, 2
    while candidate in taken:
        candidate, n = f"{full}_{n}", n + 1
    return candidate


def discover_inputs(manifest: DvcManifest, is_code: Callable[[Path, str], bool],
                    reserved: Iterable[str] = ()) -> InputCatalog:
    """The inputs of `manifest` and which stage items read which input partition (see the module docstring).

    Args:
        is_code: `(root, path) -> bool`, the translator's code test (code deps are not inputs).
        reserved: names already used by stage assets; an input never takes one of them.
    """
    deps = input_deps(manifest, is_code)
    patterns = _patterns(manifest, deps)
    instances = {p.replace(KEY, k): p for p, (_, keys) in patterns.items() for k in keys}
    atoms = set(instances) | {d for ds in deps.values() for d in ds}
    leaves = {a for a in atoms if a in instances or not any(b != a and contains(a, b) for b in atoms)}
    for coarse in sorted(atoms - leaves):
        leaves |= set(_uncovered(manifest.root, coarse, leaves))

    taken = set(reserved)
    sources: Dict[str, InputSource] = {}
    for pattern, (stage, keys) in patterns.items():
        name = _unique(input_name(pattern), pattern, taken)
        taken.add(name)
        sources[name] = InputSource(name, pattern, keys, stage)
    for path in sorted(leaves - set(instances)):
        name = _unique(input_name(path), path, taken)
        taken.add(name)
        sources[name] = InputSource(name, path)

    catalog = InputCatalog(sources)
    owners = catalog.owners()
    for item_name, item_deps in deps.items():
        item = manifest.items[item_name]
        for dep in item_deps:
            # the input partitions inside the dep (a read-whole directory), else the one holding it
            hit = [o for p, o in owners.items() if contains(dep, p)] \
                or [o for p, o in owners.items() if contains(p, dep)]
            for name, key in hit:
                catalog.edges.setdefault(item.stage, {}).setdefault(name, set()).add((key, item.key))
    return catalog


# ------------------------------------------------------------------------------------------------ Dagster
def input_assets(manifest: DvcManifest, translator) -> list:
    """One observable source asset per partitions definition (the unpartitioned inputs together, the inputs over the
    categories together), `can_subset`: observing returns each selected input's md5 as its `DataVersion`; a partitioned
    input is observed one partition per run, like the stages. `sync` records the same observations without a run."""
    import warnings

    import dagster as dg

    from .assets import _op_name

    catalog = translator.get_inputs(manifest)
    groups: Dict[Optional[Tuple[str, ...]], List[InputSource]] = {}
    for source in catalog.sources.values():
        groups.setdefault(source.keys, []).append(source)
    defs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # multi_observable_source_asset is beta in Dagster 1.13
        for keys, sources in groups.items():
            name = "observe_inputs" if keys is None else _op_name(manifest, [str(sources[0].stage)], keys, "observe")
            defs.append(_observer(name, manifest.root, sources, translator, manifest))
    return defs


def _observer(name: str, root: Path, sources: List[InputSource], translator, manifest: DvcManifest):
    import dagster as dg

    by_key = {translator.get_input_asset_key(s): s for s in sources}

    @dg.multi_observable_source_asset(
        name=name, specs=[translator.get_input_spec(manifest, s) for s in sources], can_subset=True,
        description="The md5 of each selected input file or directory, as DVC computes it.")
    def _observe(context):  # (no annotation: this module has `from __future__ import annotations`)
        partition = context.partition_key if context.has_partition_key else None
        for key in sorted(context.selected_asset_keys):
            source = by_key[key]
            if source.keys is not None and partition is None:
                raise dg.Failure(f"{key.to_user_string()} is partitioned: observe one partition per run "
                                 "(or run `python -m dagster_project sync`, which observes every input)")
            path = source.path(partition)
            version = data_version(root, path)
            yield dg.ObserveResult(asset_key=key, data_version=dg.DataVersion(version),
                                   metadata={"path": dg.MetadataValue.path(str(root / path)), "dvc/md5": version})

    return _observe
