"""Params profiles: an overlay of params.yaml run as a DVC experiment (`make run-full`).

    python -m pipelines.profiles configs/profiles/full.yaml          # print the `dvc exp run` command
    python -m pipelines.profiles configs/profiles/full.yaml --run    # run it: experiment `full` (the file's stem)

An overlay holds only the keys that differ from params.yaml, nested as there. It is merged over params.yaml and
validated with the params schema before anything runs, so a typo fails at once naming the file and the key. Each leaf
becomes one `-S key=value` of `dvc exp run` (Hydra override syntax), so the experiment's params.yaml is the merge.
A module of its own, not a command of pipelines/cli.py: every stage imports the CLI, and would rerun when this changes.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import PipelineError
from .io import read_yaml


def load_overlay(path: Path) -> Dict[str, Any]:
    data = read_yaml(path, "params overlay")
    if not isinstance(data, dict) or not data:
        raise PipelineError(f"{path}: a params overlay must be a non-empty mapping of params.yaml sections")
    return data


def deep_merge(base: Dict[str, Any], overlay: Dict[str, Any]) -> Dict[str, Any]:
    """base with overlay's values; mappings merge key by key (as `-S` does), anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def leaves(overlay: Dict[str, Any], where: str, prefix: str = "") -> List[Tuple[str, Any]]:
    """(dotted key, value) of every non-mapping value. An empty mapping is an error: merged key by key it changes
    nothing, so it can only be a mistake (a section whose keys were forgotten)."""
    out: List[Tuple[str, Any]] = []
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if not value:
                raise PipelineError(f"{where}: {dotted}: empty mapping (it changes nothing; list the keys to change)")
            out += leaves(value, where, dotted + ".")
        else:
            out.append((dotted, value))
    return out


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")  # a string Hydra reads back as the same string without quotes
_WORDS = {"null", "true", "false", "inf", "nan"}  # ... except these, which it reads as values
_BACKSLASHES_BEFORE_QUOTE = re.compile(r"(\\+)(?='|$)")  # Hydra unescapes backslashes only there


def hydra_value(value: Any) -> str:
    """A YAML value in Hydra's override grammar (what `dvc exp run -S` parses). A string that Hydra would read as
    something else ("null", "1e-3", "a b") is quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _WORDS:
            return value  # readable as it is: a name, a path
        escaped = _BACKSLASHES_BEFORE_QUOTE.sub(lambda m: m.group(1) * 2, value).replace("'", "\\'")
        return f"'{escaped}'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise PipelineError(f"cannot pass a {type(value).__name__} value to dvc exp run -S: {value!r}")


def _get(params: Any, dotted: str) -> Tuple[bool, Any]:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def set_args(keys: List[Tuple[str, Any]], params: Dict[str, Any]) -> List[str]:
    """`-S key=value` pairs; a key params.yaml does not spell out (a schema default) gets Hydra's `+` (add)."""
    args: List[str] = []
    for key, value in keys:
        args += ["-S", f"{'' if _get(params, key)[0] else '+'}{key}={hydra_value(value)}"]
    return args


def as_dvc_writes(params_path: Path, args: List[str]) -> Dict[str, Any]:
    """params.yaml as `dvc exp run` will write it: DVC's own override code applied to a copy, read back by our loader
    (the check that the experiment runs the merge: DVC writes 5e-06 where our YAML reads a string, for one)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copyfile(params_path, copy)
        try:
            apply_overrides(copy, args[1::2])
        except InvalidArgumentError as e:
            why = str(e.__cause__ or e).strip().splitlines()[0]  # Hydra adds a hint line: one line is enough
            raise PipelineError(f"dvc exp run refuses the overrides: {why}") from None
        return read_yaml(copy, "params file")


def compose(profile: Path, params_path: Path = Path("params.yaml")) -> Tuple[Dict[str, Any], List[str]]:
    """(merged params, the -S arguments) of a profile: the merge validated with the params schema, and checked to be
    what `dvc exp run` with those arguments writes.

    Raises:
        PipelineError: `<profile>: <dotted key>: <problem>`, e.g. `full.yaml: raw_cots.n_sampels: unknown key`.
    """
    from .params import parse_params

    params = read_yaml(params_path, "params file")
    if not isinstance(params, dict):
        raise PipelineError(f"{params_path}: top level must be a mapping of sections")
    overlay = load_overlay(profile)
    keys = leaves(overlay, str(profile))
    merged = deep_merge(params, overlay)
    parse_params(merged, str(profile))
    args = set_args(keys, params)
    written = as_dvc_writes(params_path, args)
    for key, value in keys:
        got = _get(written, key)[1]
        if got != value or type(got) is not type(value):
            raise PipelineError(f"{profile}: {key}: dvc exp run -S would leave params.yaml holding {got!r}, "
                                f"not {value!r}; set this value in params.yaml itself")
    return merged, args


def main(profile: Path, params_path: Path = Path("params.yaml"), run: bool = False,
         name: Optional[str] = None) -> int:
    """Print the `dvc exp run` command of `profile`, or run it (its exit code) when `run`."""
    _, args = compose(Path(profile), Path(params_path))
    cmd = ["dvc", "exp", "run", "-n", name or Path(profile).stem, *args]
    print(shlex.join(cmd), flush=True)
    return subprocess.call(cmd) if run else 0


def cli(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.profiles", description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a params overlay, e.g. configs/profiles/full.yaml")
    parser.add_argument("--run", action="store_true", help="run the `dvc exp run` command instead of printing it")
    parser.add_argument("--name", "-n", help="experiment name (default: the profile file's stem)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params.yaml the overlay changes")
    args = parser.parse_args(argv)
    try:
        return main(args.profile, args.params, args.run, args.name)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
