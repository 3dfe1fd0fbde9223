"""The project's default DVC remote: push from one checkout, pull into a fresh clone, nothing recomputed.

Uses the project's own `.dvc/config` (its default remote `~/.cache/daf-dvc-remote`) with HOME pointed at a temp dir,
so the test exercises exactly what a user gets and never writes to the real home directory.
"""
from __future__ import annotations

import configparser
import shutil

import pytest

from conftest import ROOT
from dvc_repo import dvc_md5, lock_outs, ran_stages, read_lock, reproduced_spine, sh

pytestmark = pytest.mark.slow
CONFIG = ROOT / ".dvc/config"


def project_config() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(CONFIG)
    return cfg


def default_remote_url() -> str:
    """The url of the default remote in the project's .dvc/config (fails with a pointer to the docs if none)."""
    cfg = project_config()
    name = cfg.get("core", "remote", fallback=None)
    assert name, ".dvc/config has no default remote (`remote = ...` under [core]); see docs/versioning.md"
    section = f"'remote \"{name}\"'"
    assert cfg.has_section(section), f".dvc/config: default remote {name!r} has no {section} section"
    return cfg.get(section, "url")


def test_project_default_remote_lives_outside_every_checkout():
    url = default_remote_url()
    # Home-relative: the same store for every clone of this user, no user-specific absolute path committed to git,
    # and never inside a checkout (where `git clean -fdx` or deleting the checkout would take it along).
    assert url.startswith("~/"), url
    assert "://" not in url


def test_push_then_pull_into_a_fresh_clone_restores_every_out_without_rerunning(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    remote = home / default_remote_url()[2:]  # where `~/...` points for the dvc subprocesses

    origin = reproduced_spine(tmp_path / "origin")
    shutil.copy(CONFIG, origin / ".dvc/config")
    sh("git add .dvc/config && git commit -qm 'project remote config'", origin, env=env)
    assert not remote.exists()

    push = sh("dvc push", origin, env=env)
    assert "pushed" in push.stdout, push.stdout
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*")), f"nothing under {remote}"
    assert "in sync" in sh("dvc status --cloud", origin, env=env).stdout

    # A fresh clone elsewhere; the origin (and its DVC cache) is gone, so the data can only come from the remote.
    clone = tmp_path / "elsewhere" / "clone"
    sh(f"git clone -q {origin} {clone}", tmp_path, env=env)
    shutil.rmtree(origin)
    in_git = set(sh("git ls-files", clone).stdout.split())
    outs = lock_outs(clone)
    missing = [p for p in outs if not (clone / p).exists()]
    # Only cache: false outs (metrics JSON) travel with git; every other out must come from the remote.
    assert missing and set(missing) == {p for p in outs if p not in in_git}

    pull = sh("dvc pull", clone, env=env)
    assert "Running stage" not in pull.stdout + pull.stderr
    assert all((clone / p).exists() for p in missing), pull.stdout
    lock = read_lock(clone)
    for path, md5 in outs.items():
        assert dvc_md5(clone / path) == md5, f"{path}: pulled content differs from dvc.lock"
    assert "up to date" in sh("dvc status", clone, env=env).stdout
    repro = sh("dvc repro", clone, env=env)
    assert ran_stages(repro.stdout) == set(), repro.stdout
    assert set(lock["stages"]) >= {"base_model", "sft_dataset"}
