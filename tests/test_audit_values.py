"""audit compares params by value and names the first differing key; --rehash catches an edit that restores size
and mtime (DVC's state cache trusts those)."""
from __future__ import annotations

import os

import pytest
import yaml

from dagster_project.audit import audit_params, dvc_md5, first_difference
from dagster_project.manifest import DvcManifest


def test_numbers_compare_by_value_across_yaml_versions():
    # dvc.lock written by a YAML 1.1 loader keeps `5e-05` as a string; params.yaml's 5.0e-05 is a float
    assert first_difference(5.0e-05, "5e-05", "lr") is None
    assert first_difference(1, 1.0, "epochs") is None
    assert first_difference({"a": [1, 2.0], "b": "x"}, {"a": [1.0, 2], "b": "x"}, "s") is None
    assert first_difference(True, 1, "flag") == ("flag", True, 1)  # a bool is not a number
    assert first_difference("1e-3 warmup", "0.001 warmup", "s") is not None  # only whole numeric strings


def test_the_first_differing_nested_key_is_named_with_both_values():
    now = {"sft_checkpoint": {"learning_rate": 5.0e-05, "epochs": 8, "lora": {"r": 16}}}
    then = {"sft_checkpoint": {"learning_rate": "5e-05", "epochs": 8, "lora": {"r": 8}}}
    assert first_difference(now, then, "p") == ("p.sft_checkpoint.lora.r", 16, 8)
    assert first_difference({"a": 1}, {"a": 1, "b": 2}, "p") == ("p.b", "<missing>", 2)


def test_audit_params_on_a_lock_written_with_yaml_1_1_numbers(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "true", "params": ["train"], "outs": ["out.txt"]}}}))
    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 5.0e-05\n  steps: 3\n")
    lock = ("schema: '2.0'\nstages:\n  train:\n    cmd: 'true'\n    params:\n      params.yaml:\n        train:\n"
            "          learning_rate: 5e-05\n          steps: 3\n    outs:\n    - path: out.txt\n      hash: md5\n"
            "      md5: 0cc175b9c0f1b6a831c399e269772661\n      size: 1\n")
    (tmp_path / "dvc.lock").write_text(lock)
    rows = audit_params(DvcManifest.load(tmp_path))
    assert [r.status for r in rows] == ["PASS"], rows
    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 5.0e-05\n  steps: 4\n")
    (row,) = audit_params(DvcManifest.load(tmp_path))
    assert row.status == "FAIL" and "train.steps is 4, dvc.lock has 3" in row.detail, row


def test_dvc_md5_of_files_and_directories(tmp_path):
    (tmp_path / "f.txt").write_bytes(b"abc")
    assert dvc_md5(tmp_path / "f.txt") == "900150983cd24fb0d6963f7d28e17f72"  # md5("abc")
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub/b").write_bytes(b"b")
    (d / "a").write_bytes(b"a")
    digest = dvc_md5(d)
    assert digest.endswith(".dir") and digest == dvc_md5(d)
    (d / "a").write_bytes(b"A")
    assert dvc_md5(d) != digest
