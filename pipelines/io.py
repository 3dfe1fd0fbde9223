"""Atomic file output and JSONL helpers: a reader never sees a half-written file, and a kill never leaves one behind.

Also the checks every input and output goes through, so that hostile or careless input fails early with one line:
strict JSONL (only "\\n" separates records, duplicate keys and lone surrogates are errors), one strict YAML loader
(duplicate keys are errors), path checks for inputs and outputs, the safetensors-only weights guard, and scrubbing of
registered secrets (API keys) from every text this module writes.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .errors import PipelineError


# ---------------------------------------------------------------------------- reading, with one-line errors
def _os_problem(e: OSError) -> str:
    """'is a directory' / 'permission denied' / ...: the part of an OSError worth a one-line message."""
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(e, NotADirectoryError):
        return "a parent of this path is a file, not a directory"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or type(e).__name__


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The bytes of a file; missing, a directory, unreadable -> one-line PipelineError naming the path."""
    path = Path(path)
    try:
        if not path.is_dir() and path.exists() and not path.is_file():  # a FIFO blocks, /dev/zero never ends
            raise PipelineError(f"{path}: cannot read {what}: not a regular file")
        return path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read {what}: {_os_problem(e)}") from None


def decode_utf8(data: bytes, path: str | Path, bom: bool = False) -> str:
    """Strict UTF-8 (a leading BOM dropped when `bom`); bad bytes -> one-line error naming the byte offset."""
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 (byte {e.start})") from None


# ---------------------------------------------------------------------------- secrets
# Values that must never be written: the HTTP backend registers the API key it read from the environment. A server
# that echoes the key (in a reply, a model name, an error) must not get it persisted through any of our writers.
_SECRETS: set = set()
SCRUBBED = "***"


def register_secret(value: Optional[str]) -> None:
    if value:
        _SECRETS.add(value)


def scrub_secrets(text: str) -> str:
    """`text` with every registered secret, raw or as it looks inside a JSON string, replaced by '***'."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, SCRUBBED)
        escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
        if escaped != secret and escaped in text:
            text = text.replace(escaped, SCRUBBED)
    return text


# ---------------------------------------------------------------------------- atomic output
def _pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:][:1] != "Z"
    except (OSError, ValueError):
        return True


def _remove_stale(dest: Path) -> None:
    """Remove what killed earlier writes of `dest` left beside it: their temp dirs and moved-aside old dirs.

    Temp names carry the writer's pid (`.<name>.<pid>.<8 chars>.tmp`, `.<name>.<pid>.<n>.old`): a leftover is removed
    only when its writer is dead, so two live processes writing the same destination (the CLI and a Dagster run) never
    delete each other's work. Names without a pid come from the code before pids were added: always stale."""
    name = re.escape(dest.name)
    owned = re.compile(rf"\.{name}\.(?P<pid>[0-9]+)\.(?:[a-z0-9_]{{8}}\.tmp|[0-9]+\.old)")
    legacy = re.compile(rf"\.{name}\.(?:[a-z0-9_]{{8}}\.tmp|old)")
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = owned.fullmatch(p.name)
        if m:
            pid = int(m["pid"])
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)
        elif legacy.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)


def _prepare_parent(dest: Path, is_dir: bool) -> None:
    """Create dest's parent; every reason it cannot be written to is a one-line PipelineError."""
    if not is_dir and dest.is_dir():
        raise PipelineError(f"{dest}: is a directory; expected a file path to write")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PipelineError(f"{dest}: cannot write: a parent of this path is a file, not a directory") from None
    except OSError as e:
        raise PipelineError(f"{dest}: cannot write: {_os_problem(e)}") from None


@contextmanager
def atomic_path(dest: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success it replaces `dest` in one rename, on error it is removed.

    Several processes may write the same `dest` at once: each has its own temp (and moved-aside old) directory, and
    the last rename wins; none of them fails because of the others."""
    dest = Path(dest)
    _prepare_parent(dest, is_dir)
    _remove_stale(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise PipelineError(f"{dest}: cannot write: {_os_problem(e)}") from None
    target = tmp if is_dir else tmp / dest.name
    try:
        yield target
        if is_dir:
            _swap_dir_in(tmp, dest)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_dir_in(tmp: Path, dest: Path) -> None:
    """Rename directory `tmp` to `dest`, moving an existing `dest` aside first (a rename cannot replace a non-empty
    directory). Another writer may put its own `dest` in place between our two renames: then move that one aside
    too and try again."""
    olds: List[Path] = []
    try:
        for attempt in range(100):
            if dest.exists() or dest.is_symlink():
                old = dest.with_name(f".{dest.name}.{os.getpid()}.{attempt}.old")
                try:
                    os.replace(dest, old)
                    olds.append(old)
                except FileNotFoundError:  # another writer moved it aside first
                    pass
            try:
                os.replace(tmp, dest)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                    raise
        raise PipelineError(f"{dest}: could not be replaced: other writers keep replacing it")
    finally:
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


def check_output_path(path: str | Path, what: str = "output") -> Path:
    """Check, before any work, that a file can be written at `path` (nothing is created): not a directory, no parent
    that is a file, and the nearest existing parent directory writable (tried by creating and removing a temp file,
    so a read-only mount or a root-owned directory counts). One-line PipelineError naming `what` and the path."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{what} {path}: is a directory; give a file path")
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail later
            raise PipelineError(f"{what} {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise PipelineError(f"{what} {path}: {parent} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=parent)
    except OSError as e:
        raise PipelineError(f"{what} {path}: cannot write in {parent}: {_os_problem(e)}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_input_file(path: str | Path, what: str = "input") -> Path:
    """An existing, readable regular file, or a one-line PipelineError naming `what` and the path."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{what} {path}: not found")
    if path.is_dir():
        raise PipelineError(f"{what} {path}: is a directory, not a file")
    if not path.is_file():  # a FIFO would block the read, /dev/zero would never end it
        raise PipelineError(f"{what} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise PipelineError(f"{what} {path}: permission denied")
    return path


# Lone surrogates (U+D800..U+DFFF outside a valid pair) are not text: they cannot be encoded as UTF-8 at all, and a
# JSON "\ud800" escape produces one. Writers turn them into U+FFFD, as any UTF-8 decoder does with bad bytes.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Characters str.splitlines() treats as line ends that json.dumps(ensure_ascii=False) leaves raw inside strings.
# Written as \u escapes, so a JSONL record is exactly one "\n"-terminated line for every reader (ours, jq, editors).
_RAW_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")


def _clean_text(text: str) -> str:
    return scrub_secrets(_LONE_SURROGATE.sub("\ufffd", text))


def jsonl_line(row: object) -> str:
    """One JSONL record, without its newline: no raw line separator, no lone surrogate, no registered secret."""
    line = json.dumps(row, ensure_ascii=False)
    line = _RAW_LINE_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", line)
    return _clean_text(line)


def write_text(dest: str | Path, text: str) -> None:
    data = _clean_text(text).encode("utf-8")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json(dest: str | Path, obj: object) -> None:
    write_text(dest, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(dest: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(dest) as tmp:
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(jsonl_line(row) + "\n")


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_without_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """json object_pairs_hook: a key given twice is an error (json.loads would silently keep the last value)."""
    obj: Dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _lone_surrogate_in(value: Any) -> Optional[str]:
    """The first lone surrogate in any string (or key) of a parsed JSON value, else None."""
    if isinstance(value, str):
        m = _LONE_SURROGATE.search(value)
        return m.group() if m else None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate_in(k) or _lone_surrogate_in(v)
            if found:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _lone_surrogate_in(v)
            if found:
                return found
    return None


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[Tuple[int, dict]]:
    """(line number, object) for each non-blank line; every problem is a one-line error naming file and line.

    Records are separated by "\\n" only (JSONL). str.splitlines() would also split at U+2028, U+0085, \\x0c, ...,
    which JSON allows raw inside strings, so a valid record holding one would be cut in two and its own writer could
    not read it back. A key given twice in an object and a lone surrogate (a "\\ud800" escape, not text) are errors.
    """
    path = Path(path)
    text = decode_utf8(read_bytes(path, what), path)
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip(" \t\r"):  # JSON whitespace only: any other character is part of a (bad) record
            continue
        try:
            row = json.loads(line, object_pairs_hook=_object_without_duplicates)
        except _DuplicateKey as e:
            raise PipelineError(f"{path}:{n}: duplicate key {_short(e.key)} in a JSON object") from None
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise PipelineError(f"{path}:{n}: invalid JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        if "\\u" in line:  # a lone surrogate can only come from an escape: skip the walk for plain lines
            bad = _lone_surrogate_in(row)
            if bad:
                raise PipelineError(f"{path}:{n}: lone surrogate \\u{ord(bad):04x} is not valid Unicode text")
        yield n, row


def check_fields(where: str, row: dict, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """Missing or unknown keys of a JSONL row -> one-line error at `where` (file:line)."""
    missing = [k for k in required if k not in row]
    if missing:
        raise PipelineError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(row) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join([*required, *optional])
        raise PipelineError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {allowed})")


def read_jsonl(path: str | Path) -> List[dict]:
    """Read a produced JSONL file (an upstream stage's out)."""
    return [row for _, row in iter_jsonl(path, "file (run the upstream stage first)")]


def read_text(path: str | Path, what: str = "file") -> str:
    """UTF-8 text with universal newlines (as Path.read_text); missing, a directory, unreadable or not UTF-8 -> a
    one-line PipelineError naming the path."""
    path = Path(path)
    text = decode_utf8(read_bytes(path, what), path)
    return text.replace("\r\n", "\n").replace("\r", "\n")


@functools.lru_cache(maxsize=None)
def _strict_yaml_loader():
    """SafeLoader whose mappings refuse a key given twice (PyYAML keeps the last one: a second `raw_cots:` section
    would silently replace the first). Built lazily so importing this module does not import yaml."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: Dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are overridable defaults
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        hash(key)
                    except TypeError:  # unhashable key: SafeLoader reports it below
                        continue
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {str(key)[:60]!r} (first at line {seen[key] + 1})",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def load_yaml(text: str, source: str | Path) -> Any:
    """Parse YAML safely and strictly: a duplicate key, a syntax error or a lone surrogate is a one-line
    PipelineError naming `source` and the line. Every human-edited YAML file goes through this."""
    import yaml

    StrictSafeLoader = _strict_yaml_loader()  # a SafeLoader subclass: no Python objects are ever built
    try:
        data = yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise PipelineError(f"{source}:{where} invalid YAML: {problem}") from None
    except RecursionError:
        raise PipelineError(f"{source}: invalid YAML: nested too deeply") from None
    bad = _lone_surrogate_in(data)
    if bad:
        raise PipelineError(f"{source}: lone surrogate \\u{ord(bad):04x} is not valid Unicode text")
    return data


def read_yaml(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    return load_yaml(decode_utf8(read_bytes(path, what), path), path)


# ---------------------------------------------------------------------------- model weights: safetensors only
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header
_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.json")


def _json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(decode_utf8(read_bytes(path, what), path))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise PipelineError(f"{path}: {what} is not valid JSON (nested too deeply)") from None


def check_safetensors_file(path: Path) -> None:
    """Check that `path` is a well-formed safetensors file (header length, JSON header, tensor offsets inside the
    file) without loading it, so garbage bytes are a one-line error and not a loader traceback."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise PipelineError(f"{path}: not a safetensors file (bad header length)")
            header = f.read(n)
    except OSError as e:
        raise PipelineError(f"{path}: cannot read weights: {_os_problem(e)}") from None
    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise PipelineError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(meta, dict):
        raise PipelineError(f"{path}: not a safetensors file (header is not a JSON object)")
    body = size - 8 - n
    tensors = 0
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= body
                or not isinstance(info.get("dtype"), str)
                or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise PipelineError(f"{path}: not a safetensors file (bad entry for tensor {_short(str(name))})")
        tensors += 1
    if not tensors:
        raise PipelineError(f"{path}: safetensors file holds no tensors")


def check_safetensors_checkpoint(model_dir: str | Path) -> None:
    """Refuse, with one line, an HF checkpoint directory that would make transformers (`use_safetensors=True`) read
    anything but safetensors, or fail on bad files: resolve every weight file it would load (model.safetensors, or
    each shard named by model.safetensors.index.json) and check each is a real safetensors file; a shard index that
    names a .bin/.pt/pickle file or a path outside the directory is refused. A peft adapter_config.json is refused too
    (it makes transformers load another model and adapter weights). config.json and the tokenizer's JSON files must
    be valid JSON."""
    d = Path(model_dir)
    if not d.is_dir():
        raise PipelineError(f"{d}: model directory not found")
    for name in _JSON_FILES:
        f = d / name
        if name == "config.json" or f.exists() or f.is_symlink():
            data = _json_file(f, name)
            if name == "config.json" and not isinstance(data, dict):
                raise PipelineError(f"{f}: config.json must be a JSON object, got {type(data).__name__}")
    if (d / "adapter_config.json").exists():
        raise PipelineError(f"{d}: adapter_config.json found: give a merged checkpoint (adapter checkpoints make "
                            "transformers load other weights, possibly pickles)")
    if (d / SAFE_WEIGHTS).exists() or (d / SAFE_WEIGHTS).is_symlink():
        if not (d / SAFE_WEIGHTS).is_file():
            raise PipelineError(f"{d / SAFE_WEIGHTS}: not a regular file")
        check_safetensors_file(d / SAFE_WEIGHTS)
        return
    index = d / SAFE_INDEX
    if not (index.exists() or index.is_symlink()):
        raise PipelineError(f"{d}: no {SAFE_WEIGHTS} or {SAFE_INDEX} (only safetensors weights are loaded; "
                            "pickle checkpoints such as pytorch_model.bin are not)")
    data = _json_file(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise PipelineError(f"{index}: no weight_map (tensor name -> shard file)")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise PipelineError(f"{index}: weight_map values must be file names")
    for shard in sorted(set(weight_map.values())):
        rel = Path(shard)
        if not shard.endswith(".safetensors"):
            raise PipelineError(f"{index}: maps tensors to {_short(shard)}, not a .safetensors file "
                                "(pickle checkpoints are not loaded)")
        if rel.is_absolute() or ".." in rel.parts or not shard.strip():
            raise PipelineError(f"{index}: shard {_short(shard)} is outside the checkpoint directory")
        if not (d / rel).is_file():
            raise PipelineError(f"{index}: shard {_short(shard)} not found")
        check_safetensors_file(d / rel)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
