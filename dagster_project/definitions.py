"""The `defs` Dagster loads: `dg dev`, `dagster dev -m dagster_project.definitions`, `dg check defs`.

The DVC project is the repository this package sits in; set DVC_PROJECT_DIR to point the same code at another
checkout (a CI worktree, a copy on shared storage).
"""
from __future__ import annotations

import os
from pathlib import Path

from .build import build_definitions

PROJECT_DIR = Path(os.environ.get("DVC_PROJECT_DIR") or Path(__file__).resolve().parents[1])

defs = build_definitions(PROJECT_DIR)
