"""Labelled sets that train the measurement models, split by who wrote the answers.

A split file (splits.yaml beside the rows) maps train / dev / test to lists of writers (assistant voices). Splitting by
writer, not by row, is what makes the test figure mean "on assistants never seen": rows of one voice share phrasing,
and a row-level split would leak it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Tuple, TypeVar

from .errors import PipelineError
from .io import read_yaml

SPLITS = ("train", "dev", "test")


def read_splits(path: str | Path) -> Dict[str, str]:
    """{writer: split} from a splits.yaml; a writer in two splits, an unknown split or a missing file is one line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (maps each writer to train, dev or test)")
    data = read_yaml(path, "split file") or {}  # the one strict loader: a duplicated split key is an error
    if not isinstance(data, dict) or set(data) - set(SPLITS) or not all(isinstance(v, list) for v in data.values()):
        raise PipelineError(f"{path}: expected keys {', '.join(SPLITS)}, each a list of writers")
    where: Dict[str, str] = {}
    for split, writers in data.items():
        for w in writers:
            if w in where:
                raise PipelineError(f"{path}: writer {w!r} is in both {where[w]} and {split}")
            where[str(w)] = split
    return where


T = TypeVar("T")
_LOADED: Dict[str, Tuple[object, object]] = {}


def load_cached(default_dir: Path, env: str, loader: Callable[[Path], T]) -> T:
    """Load a trained measurement model once per process, again only when its files change.

    Stages run from the project root and read `default_dir` (a DVC out); when that does not exist, the directory in
    the environment variable `env` is used (a stage run from elsewhere, the test suite)."""
    where = default_dir if default_dir.is_dir() or not os.environ.get(env) else Path(os.environ[env])
    where = where.resolve()
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in where.iterdir())) if where.is_dir() else None
    hit = _LOADED.get(str(where))
    if hit is None or hit[0] != stamp:
        hit = (stamp, loader(where))
        _LOADED[str(where)] = hit
    return hit[1]  # type: ignore[return-value]


def save_model(out_dir: Path, tensors: Dict[str, "object"], config: dict) -> None:
    """Write a measurement model as model.safetensors + config.json (never a pickle)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    # contiguous copies: safetensors writes the raw buffer, so a transposed view would be saved scrambled
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_model(model_dir: Path, shapes: Dict[str, tuple], what: str, stage: str,
               feature_version: int) -> Tuple[Dict[str, "object"], dict]:
    """(tensors, config) of a measurement model; missing, unreadable, mis-shaped or other-version files are one line
    naming the stage that makes them."""
    import json

    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / "config.json", model_dir / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise PipelineError(f"{what} not found in {model_dir}/ (config.json + model.safetensors): run "
                            f"`dvc repro {stage}` (or `python -m pipelines {stage}`) first")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        tensors = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001 - any corrupt file is one clear line
        raise PipelineError(f"{model_dir}: unreadable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("feature_version") != feature_version:
        got = config.get("feature_version") if isinstance(config, dict) else None
        raise PipelineError(f"{cfg_path}: made by another version of the {what} (feature_version {got}, this code "
                            f"{feature_version}): rerun `dvc repro {stage}`")
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            raise PipelineError(f"{w_path}: expected tensor {name} of shape {shape}")
    return tensors, config
