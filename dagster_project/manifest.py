"""`DvcManifest`: dvc.yaml (foreach expanded), dvc.lock and params.yaml read into stage nodes. No Dagster import.

DVC resolves the `foreach`/`matrix` templates itself: we ask `dvc.repo.Repo(root).index` for its resolved
`PipelineStage`s (`raw_cots@violence`, ...) instead of re-implementing `${item}` / `${key}` / `vars` / params.yaml
interpolation. That way every feature DVC accepts in dvc.yaml (dict foreach, matrix, `${params.key}`, vars files,
nested dvc.yaml files) is resolved exactly as `dvc repro` resolves it, and a typo fails here with DVC's own error.
Only two things come from the raw YAML: which top-level stages are templates (to group items into one node) and the
unexpanded `cmd` of a template (so a node's code version does not change when a category is added).

    manifest = DvcManifest.load(".")
    manifest.stages["raw_cots"].keys        # ('erotic', ..., 'violence'), from params.yaml `categories`
    manifest.items["raw_cots@violence"].deps
    manifest.upstream_items("judged_cots@violence")   # {'spec_chunks@violence', 'raw_cots@violence'}
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

JOIN = "@"  # DVC names a foreach/matrix item "<stage>@<key>"


class ManifestError(Exception):
    """dvc.yaml / dvc.lock / params.yaml could not be read; the message names the file."""


@dataclass(frozen=True)
class Out:
    path: str  # relative to the project root, posix
    cache: bool = True
    metric: bool = False
    plot: bool = False

    @property
    def is_data(self) -> bool:
        """A real artifact (not a metrics/plots file): these make up the data version."""
        return not (self.metric or self.plot)


@dataclass(frozen=True)
class ParamRef:
    file: str  # params file relative to the root (params.yaml)
    key: Optional[str]  # dotted key; None = the whole file


@dataclass(frozen=True)
class StageItem:
    """One resolved DVC stage: `raw_cots@violence` (an item of a foreach stage) or `sft_dataset`."""

    name: str  # DVC's address: `raw_cots@violence`
    stage: str  # the dvc.yaml stage it comes from: `raw_cots`
    key: Optional[str]  # the foreach key (`violence`), None for a plain stage
    cmd: str
    deps: Tuple[str, ...]  # file/dir deps, root-relative posix paths (params files excluded)
    outs: Tuple[Out, ...]
    params: Tuple[ParamRef, ...]
    desc: Optional[str] = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    dvcfile: str = "dvc.yaml"

    @property
    def data_outs(self) -> Tuple[Out, ...]:
        return tuple(o for o in self.outs if o.is_data) or self.outs

    @property
    def metric_outs(self) -> Tuple[Out, ...]:
        return tuple(o for o in self.outs if o.metric)


@dataclass(frozen=True)
class DvcStage:
    """A dvc.yaml stage: a plain stage (one item) or a foreach/matrix template (one item per key)."""

    name: str
    items: Tuple[StageItem, ...]
    is_template: bool  # foreach/matrix
    template_cmd: str  # `cmd` before interpolation (templates) or the cmd itself
    desc: Optional[str] = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    foreach_source: Optional[str] = None  # the raw `foreach:` expression when it is a string (`${categories}`)

    @property
    def keys(self) -> Optional[Tuple[str, ...]]:
        """Foreach keys in dvc.yaml order, or None for a plain stage."""
        return tuple(i.key for i in self.items) if self.is_template else None

    @property
    def deps(self) -> Tuple[str, ...]:
        seen: Dict[str, None] = {}
        for item in self.items:
            seen.update(dict.fromkeys(item.deps))
        return tuple(seen)

    @property
    def params(self) -> Tuple[ParamRef, ...]:
        seen: Dict[ParamRef, None] = {}
        for item in self.items:
            seen.update(dict.fromkeys(item.params))
        return tuple(seen)

    def item(self, key: Optional[str]) -> StageItem:
        for i in self.items:
            if i.key == key:
                return i
        raise KeyError(f"stage {self.name!r} has no item {key!r} (keys: {self.keys})")


# ------------------------------------------------------------------------------------------------ path helpers
def _norm(path: str) -> str:
    return PurePosixPath(os.path.normpath(path).replace(os.sep, "/")).as_posix()


def contains(outer: str, inner: str) -> bool:
    """True when `inner` is `outer` or lies inside the directory `outer`."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def dep_matches_out(dep: str, out: str) -> bool:
    """A dep consumes an out when they are the same path, the dep is a directory holding the out
    (`data/judged_cots` holds `data/judged_cots/violence.jsonl`), or the dep is a file inside an out directory."""
    return contains(dep, out) or contains(out, dep)


def lookup(data: Any, dotted: Optional[str]) -> Any:
    """`lookup(params, "judged_cots.judge")`; a missing key raises KeyError naming it."""
    if dotted is None:
        return data
    node = data
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


# libyaml's parser when PyYAML has it: dvc.lock of the full pipeline is ~150k YAML nodes, and the pure-Python
# parser took 0.25 s per read (17 s of a 31 s no-op `full_pipeline` run, which re-reads it after every item).
_FAST = getattr(yaml, "__with_libyaml__", False)
_PARSED: Dict[Tuple[str, int, int, int], Any] = {}  # (path, inode, mtime_ns, size) -> parsed document


def _read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; an unchanged file (same inode, mtime and size) is not parsed again."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
        if key not in _PARSED:
            if len(_PARSED) > 64:
                _PARSED.clear()
            text = path.read_text(encoding="utf-8")
            _PARSED[key] = yaml.load(text, Loader=yaml.CSafeLoader) if _FAST else yaml.safe_load(text)
        return copy.deepcopy(_PARSED[key])  # callers may change what they get
    except FileNotFoundError:
        raise ManifestError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ManifestError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None


# ------------------------------------------------------------------------------------------------ manifest
class DvcManifest:
    """The project's DVC pipeline as data: stages (templates grouped), items, the item graph, lock and params.

    Build it with `DvcManifest.load(root)`; it is a snapshot (call `load` again after a `dvc repro` to see the new lock).
    """

    def __init__(self, root: Path, items: Iterable[StageItem], raw: Mapping[str, Mapping[str, Any]],
                 lock: Mapping[str, Any], params_files: Mapping[str, Any]):
        self.root = Path(root)
        self.items: Dict[str, StageItem] = {i.name: i for i in items}
        self.lock = lock  # dvc.lock `stages` mapping: item name -> {cmd, deps, params, outs}
        self.params_files = params_files  # file -> parsed YAML (params.yaml and any other params file in use)
        stages: Dict[str, DvcStage] = {}
        grouped: Dict[str, List[StageItem]] = {}
        for item in self.items.values():
            grouped.setdefault(item.stage, []).append(item)
        for name, members in grouped.items():
            definition = raw.get(name, {})
            template = "foreach" in definition or "matrix" in definition
            body = definition.get("do", definition) if "foreach" in definition else definition
            cmd = body.get("cmd", members[0].cmd)
            stages[name] = DvcStage(
                name=name, items=tuple(members), is_template=template,
                template_cmd="\n".join(cmd) if isinstance(cmd, list) else str(cmd),
                desc=body.get("desc") or members[0].desc, meta=body.get("meta") or members[0].meta or {},
                foreach_source=definition["foreach"] if isinstance(definition.get("foreach"), str) else None,
            )
        self.stages: Dict[str, DvcStage] = stages

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, root: str | Path = ".") -> "DvcManifest":
        root = Path(root).resolve()
        if not (root / "dvc.yaml").is_file():
            raise ManifestError(f"{root / 'dvc.yaml'}: not found (is {root} the project root?)")
        items, raw_by_file = cls._resolve_with_dvc(root)
        raw: Dict[str, Mapping[str, Any]] = {}
        for stages in raw_by_file.values():
            raw.update(stages)
        lock: Dict[str, Any] = {}
        lock_path = root / "dvc.lock"
        if lock_path.is_file():
            lock = dict((_read_yaml(lock_path, "dvc.lock") or {}).get("stages") or {})
        params_files: Dict[str, Any] = {}
        for item in items:
            for ref in item.params:
                if ref.file not in params_files:
                    p = root / ref.file
                    params_files[ref.file] = _read_yaml(p, "params file") if p.is_file() else {}
        if "params.yaml" not in params_files and (root / "params.yaml").is_file():
            params_files["params.yaml"] = _read_yaml(root / "params.yaml", "params file")
        return cls(root, items, raw, lock, params_files)

    def with_fresh_lock(self) -> "DvcManifest":
        """The same stages with dvc.lock and the params files read again (cheap: DVC is not asked to resolve)."""
        fresh = DvcManifest.__new__(DvcManifest)
        fresh.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        lock_path = self.root / "dvc.lock"
        fresh.lock = dict((_read_yaml(lock_path, "dvc.lock") or {}).get("stages") or {}) if lock_path.is_file() else {}
        fresh.params_files = {f: (_read_yaml(self.root / f, "params file") if (self.root / f).is_file() else {})
                              for f in self.params_files}
        return fresh

    @staticmethod
    def _resolve_with_dvc(root: Path) -> Tuple[List[StageItem], Dict[str, Mapping[str, Any]]]:
        """Let DVC expand dvc.yaml (foreach/matrix/vars/params interpolation) and convert its stages."""
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
        from dvc.stage import PipelineStage

        items: List[StageItem] = []
        raw_by_file: Dict[str, Mapping[str, Any]] = {}
        try:
            with Repo(str(root), uninitialized=True) as repo:
                stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
                for s in stages:
                    dvcfile = _norm(os.path.relpath(s.dvcfile.path, root))
                    if dvcfile not in raw_by_file:
                        raw_by_file[dvcfile] = (_read_yaml(root / dvcfile, "dvc.yaml") or {}).get("stages") or {}
                    items.append(_item_from_dvc(root, s, dvcfile, raw_by_file[dvcfile]))
        except DvcException as e:
            raise ManifestError(f"{root / 'dvc.yaml'}: DVC could not resolve the pipeline: {e}") from None
        return items, raw_by_file

    # -------------------------------------------------------------------------------------------- graph
    @cached_property
    def _upstream(self) -> Dict[str, Tuple[str, ...]]:
        """item -> items whose outs it depends on (outs matched to deps, directory containment counts)."""
        producers = [(o.path, i.name) for i in self.items.values() for o in i.outs]
        up: Dict[str, Tuple[str, ...]] = {}
        for item in self.items.values():
            found = {name for dep in item.deps for out, name in producers
                     if name != item.name and dep_matches_out(dep, out)}
            up[item.name] = tuple(n for n in self.items if n in found)  # dvc.yaml order
        return up

    def upstream_items(self, item: str) -> Tuple[str, ...]:
        return self._upstream[item]

    @cached_property
    def _downstream(self) -> Dict[str, Tuple[str, ...]]:
        down: Dict[str, List[str]] = {n: [] for n in self.items}
        for name, ups in self._upstream.items():
            for u in ups:
                down[u].append(name)
        return {k: tuple(v) for k, v in down.items()}

    def downstream_items(self, item: str) -> Tuple[str, ...]:
        return self._downstream[item]

    def descendants(self, items: Iterable[str]) -> List[str]:
        """Every item downstream of `items` (not including them unless reached), in topological order."""
        seen: set = set()
        todo = list(items)
        while todo:
            for d in self._downstream[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return [n for n in self.topological_order() if n in seen]

    def stage_edges(self) -> Dict[Tuple[str, str], List[Tuple[Optional[str], Optional[str]]]]:
        """(upstream stage, downstream stage) -> [(upstream key, downstream key), ...] item edges."""
        edges: Dict[Tuple[str, str], List[Tuple[Optional[str], Optional[str]]]] = {}
        for name, ups in self._upstream.items():
            down = self.items[name]
            for u in ups:
                up = self.items[u]
                if up.stage != down.stage:
                    edges.setdefault((up.stage, down.stage), []).append((up.key, down.key))
        return edges

    def topological_order(self) -> List[str]:
        """Item names, upstream first (ties in dvc.yaml order); a cycle raises ManifestError."""
        order: List[str] = []
        state: Dict[str, int] = {}

        def visit(n: str, path: Tuple[str, ...]) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise ManifestError(f"dvc.yaml: dependency cycle: {' -> '.join(path + (n,))}")
            state[n] = 1
            for u in self._upstream[n]:
                visit(u, path + (n,))
            state[n] = 2
            order.append(n)

        for n in self.items:
            visit(n, ())
        return order

    def stage_order(self) -> List[str]:
        seen: Dict[str, None] = {}
        for n in self.topological_order():
            seen.setdefault(self.items[n].stage, None)
        return list(seen)

    def source_deps(self, stage: str) -> Tuple[str, ...]:
        """Deps of a stage that no stage produces (human-edited inputs such as data/spec)."""
        outs = [o.path for i in self.items.values() for o in i.outs]
        return tuple(d for d in self.stages[stage].deps if not any(dep_matches_out(d, o) for o in outs))

    # -------------------------------------------------------------------------------------------- lock and params
    def lock_entry(self, item: str) -> Optional[Mapping[str, Any]]:
        return self.lock.get(item)

    def lock_outs(self, item: str) -> Dict[str, str]:
        """out path -> md5 recorded in dvc.lock (empty when the item never ran)."""
        entry = self.lock.get(item) or {}
        return {_norm(o["path"]): str(o.get("md5") or o.get("etag") or o.get("checksum") or "")
                for o in entry.get("outs") or []}

    def lock_deps(self, item: str) -> Dict[str, str]:
        entry = self.lock.get(item) or {}
        return {_norm(d["path"]): str(d.get("md5") or "") for d in entry.get("deps") or []}

    def lock_params(self, item: str) -> Dict[str, Dict[str, Any]]:
        """params file -> {key: value} as recorded in dvc.lock."""
        entry = self.lock.get(item) or {}
        return {f: dict(v or {}) for f, v in (entry.get("params") or {}).items()}

    def param_values(self, item_or_stage: str) -> Dict[str, Any]:
        """`file:key` -> current value in the params file, for the params the item/stage declares.
        A key missing from the file maps to the string "<missing>" (DVC itself reports it as deleted)."""
        refs = (self.stages[item_or_stage].params if item_or_stage in self.stages
                else self.items[item_or_stage].params)
        out: Dict[str, Any] = {}
        for ref in refs:
            try:
                value = lookup(self.params_files.get(ref.file, {}), ref.key)
            except KeyError:
                value = "<missing>"
            out[f"{ref.file}:{ref.key or '*'}"] = value
        return out

    @property
    def params(self) -> Mapping[str, Any]:
        """Parsed params.yaml (empty mapping if there is none)."""
        return self.params_files.get("params.yaml") or {}


def _item_from_dvc(root: Path, s: Any, dvcfile: str, raw: Mapping[str, Any]) -> StageItem:
    from dvc.dependency.param import ParamsDependency

    def rel(p: str) -> str:
        return _norm(os.path.relpath(os.path.join(s.wdir, p), root))

    deps: List[str] = []
    params: List[ParamRef] = []
    for d in s.deps:
        if isinstance(d, ParamsDependency):
            keys = list(d.params) or [None]
            params.extend(ParamRef(rel(d.def_path), k) for k in keys)
        else:
            deps.append(rel(d.def_path))
    outs = tuple(Out(rel(o.def_path), cache=bool(o.use_cache), metric=bool(o.metric), plot=bool(o.plot))
                 for o in s.outs)
    stage, key = s.name, None
    if JOIN in s.name:
        base, _, rest = s.name.partition(JOIN)
        if base in raw and ("foreach" in raw[base] or "matrix" in raw[base]):
            stage, key = base, rest
    cmd = "\n".join(s.cmd) if isinstance(s.cmd, list) else str(s.cmd or "")
    # DVC's `addressing` is relative to the process cwd; name items relative to the project root instead
    name = s.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{s.name}"
    return StageItem(name=name, stage=stage, key=key, cmd=cmd,
                     deps=tuple(deps), outs=outs, params=tuple(params), desc=s.desc, meta=dict(s.meta or {}),
                     dvcfile=dvcfile)
