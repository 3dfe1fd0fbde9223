"""The whole DAG with real `dvc repro`: tiny random base model, fake generator, a few SFT/GRPO steps, tiny evals.
Checks every stage ran, the checkpoints reload and generate, metrics exist for every model, and a rerun is a no-op."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from conftest import ROOT, fake_params
from test_dvc_pipeline import sh
from tiny_model import make_tiny_model

pytestmark = pytest.mark.slow


def tiny_params() -> dict:
    p = fake_params()
    p["base_model"]["local_path"] = "tiny_base"
    p["raw_cots"]["n_samples"] = 3
    p["sft_checkpoint"].update(max_steps=2, per_device_batch_size=2, max_length=256, save_steps=1)
    p["rl_checkpoint"].update(max_steps=1, per_device_batch_size=4, num_generations=2, max_completion_length=8,
                              max_prompts_per_category=1, harmful_share=None)  # the first rows: all harmful
    p["eval_scores"]["sets"].update(harmful=1, benign=1, jailbreak=1, transforms=["base64", "roleplay"])
    p["eval_scores"]["sampling"]["max_new_tokens"] = 8
    return p


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("fullrepo")
    for sub in ("pipelines", "configs", "data/spec", "data/prompts", "data/evals"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / f, d / f)
    make_tiny_model(d / "tiny_base")
    (d / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    sh("git init -q && git config user.email t@t && git config user.name t && dvc init -q", d)
    sh("git add -A && git commit -qm init", d)
    return d


def test_full_dag(repo):
    log = sh("dvc repro", repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    for stage in ("base_model", "sft_dataset", "sft_checkpoint", "rl_checkpoint", "eval_scores@base",
                  "eval_scores@sft", "eval_scores@rl", "report"):
        assert stage in ran, (stage, sorted(ran))
    assert "up to date" in sh("dvc status", repo).stdout
    assert not re.findall(r"Running stage", sh("dvc repro", repo).stdout)

    for model in ("base", "sft", "rl"):
        m = json.loads((repo / f"data/metrics/eval_scores/{model}.json").read_text())
        assert 0.0 <= m["not_unsafe"] <= 1.0 and 0.0 <= m["not_overrefuse"] <= 1.0 and m["items"] > 0
    report = (repo / "data/report/report.md").read_text()
    assert all(m in report for m in ("base", "sft", "rl"))
    for png in ("pareto.png", "per_category.png"):
        assert (repo / "data/report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = sh("dvc metrics show --json", repo).stdout
    assert "eval_scores/rl.json" in shown and "sft_checkpoint.json" in shown

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for ckpt in ("sft_checkpoint", "rl_checkpoint"):
        path = repo / "data" / ckpt
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
