"""How the training stages report: TRL config knobs from params.yaml (typed keys and the free-form `trl_extra`),
DVCLive as the one logger of curves and metrics (no wall-clock value in a DVC out), and per-step lines streamed to a
Dagster run through Dagster Pipes, which stay silent when Dagster is not there.

The last test is end to end: a real Dagster materialization of the sft_checkpoint stage in a temp git + DVC repo,
`dvc repro` run by `DvcCliResource`, 2 steps of a tiny random model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from conftest import ROOT, fake_params
from dvc_repo import build_repo, tool_env
from pipelines import rl_checkpoint, sft_checkpoint
from pipelines.errors import PipelineError
from pipelines.params import parse_params
from pipelines.params.training import RlCheckpointParams
from pipelines.training_common import dagster_pipes_channel, is_wall_clock, loggable, preflight

PIPES_ENV = ("DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES")


def _params(tmp: Path, **sections):
    for d in ("spec", "prompts"):
        (tmp / d).mkdir(exist_ok=True)
    return parse_params({"categories": ["violence"],
                         "paths": {"spec": str(tmp / "spec"), "prompts": str(tmp / "prompts"), "work": "work"},
                         **sections})


# ------------------------------------------------------------------------------------------------ TRL config
def test_typed_knobs_and_trl_extra_reach_the_built_config(tmp_path):
    rl = _params(tmp_path, rl_checkpoint={
        "loss_type": "dr_grpo", "vllm_mode": "server", "log_completions": True,
        "trl_extra": {"num_iterations": 2, "vllm_server_port": 8123, "report_to": ["tensorboard"]},
    }).rl_checkpoint
    cfg = rl_checkpoint.grpo_config(rl, tmp_path / "work")
    assert (cfg.loss_type, cfg.vllm_mode, cfg.log_completions, cfg.use_vllm) == ("dr_grpo", "server", True, False)
    assert (cfg.num_iterations, cfg.vllm_server_port, cfg.report_to) == (2, 8123, ["tensorboard"])
    assert (cfg.max_steps, cfg.temperature) == (rl.max_steps, rl.temperature)  # the typed keys still set theirs

    sft = _params(tmp_path, sft_checkpoint={"loss_type": "dft", "trl_extra": {"neftune_noise_alpha": 5}}).sft_checkpoint
    cfg = sft_checkpoint.sft_config(sft, tmp_path / "work", steps=3)
    assert (cfg.loss_type, cfg.neftune_noise_alpha, cfg.max_steps, cfg.report_to) == ("dft", 5.0, 3, [])


@pytest.mark.parametrize("section, extra, message", [
    ("rl_checkpoint", {"num_iteration": 2},
     "rl_checkpoint.trl_extra.num_iteration: not a field of trl.GRPOConfig (did you mean num_iterations?)"),
    ("rl_checkpoint", {"num_iterations": "two"}, "rl_checkpoint.trl_extra.num_iterations: Input should be a valid"),
    ("rl_checkpoint", {"log_completions_hub_repo": "someone/completions"},
     "rl_checkpoint.trl_extra.log_completions_hub_repo: trl.GRPOConfig refuses it: "),
    ("sft_checkpoint", {"learning_rate": 1e-3},
     "sft_checkpoint.trl_extra.learning_rate: the stage sets it from sft_checkpoint.learning_rate"),
    ("sft_checkpoint", {"per_device_train_batch_size": 8},
     "sft_checkpoint.trl_extra.per_device_train_batch_size: the stage sets it from sft_checkpoint.per_device_batch_size"),
    ("sft_checkpoint", {"report_to": "dvclive"}, "sft_checkpoint.trl_extra.report_to: DVCLive already logs"),
])
def test_bad_trl_extra_fails_in_one_line_naming_the_key(tmp_path, section, extra, message):
    p = getattr(_params(tmp_path, **{section: {"trl_extra": extra}}), section)
    build = rl_checkpoint.grpo_config if section == "rl_checkpoint" else (
        lambda s, w: sft_checkpoint.sft_config(s, w, steps=3))
    with pytest.raises(PipelineError) as err:
        build(p, tmp_path / "work")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_typed_knobs_fail_when_params_are_read(tmp_path):
    with pytest.raises(PipelineError, match="rl_checkpoint.loss_type"):
        _params(tmp_path, rl_checkpoint={"loss_type": "ppo"})
    with pytest.raises(PipelineError, match="rl_checkpoint.vllm_mode"):
        _params(tmp_path, rl_checkpoint={"vllm_mode": "remote"})
    with pytest.raises(PipelineError, match="sft_checkpoint.trl_extra"):
        _params(tmp_path, sft_checkpoint={"trl_extra": ["neftune_noise_alpha"]})


def test_vllm_needs_cuda_and_the_package():
    rl = RlCheckpointParams(use_vllm=True, device="auto")
    with pytest.raises(PipelineError, match=r"^rl_checkpoint.use_vllm: vLLM generates on CUDA only"):
        preflight(rl, "rl_checkpoint", cuda=False, deepspeed_installed=False, launcher_config=None)
    with pytest.raises(PipelineError, match=r"^rl_checkpoint.use_vllm: vllm is not installed"):
        preflight(rl, "rl_checkpoint", cuda=True, deepspeed_installed=False, launcher_config=None)
    preflight(rl, "rl_checkpoint", cuda=True, deepspeed_installed=False, launcher_config=None, vllm_installed=True)


# ------------------------------------------------------------------------------------------------ what is logged
def test_wall_clock_keys_never_reach_dvc_outs():
    row = {"loss": 1.5, "learning_rate": 1e-4, "rewards/judge_reward/mean": 0.5, "completions/mean_length": 7.0,
           "step_time": 3.2, "train_runtime": 9.9, "train_tokens_per_second": 100.0, "train_samples_per_second": 2.0,
           "step": 4, "epoch": 1.0, "note": "text", "flag": True}
    kept = loggable(row)
    assert sorted(kept) == ["completions/mean_length", "epoch", "learning_rate", "loss", "rewards/judge_reward/mean"]
    assert list(kept) == sorted(kept)  # key order never depends on how the row was built
    assert all(is_wall_clock(k) for k in ("step_time", "train_runtime", "train_steps_per_second", "profiling/time"))


def test_pipes_channel_is_silent_outside_dagster(monkeypatch):
    for var in PIPES_ENV:
        monkeypatch.delenv(var, raising=False)
    with dagster_pipes_channel() as pipes:
        assert pipes is None
    # inside Dagster, only rank 0 talks: another rank gets None without reading the (here bogus) pipes variables
    monkeypatch.setenv("DAGSTER_PIPES_CONTEXT", "not-read")
    monkeypatch.setenv("RANK", "1")
    with dagster_pipes_channel() as pipes:
        assert pipes is None


# ------------------------------------------------------------------------------------------------ end to end
def _sft_repo(dest: Path) -> Path:
    """A git + DVC repo with the real sft_checkpoint stage, a tiny base model and 4 training rows; 2 training steps."""
    repo = build_repo(dest, stages=("sft_checkpoint",), commit=False, params={
        "sft_checkpoint.max_steps": 2, "sft_checkpoint.per_device_batch_size": 2, "sft_checkpoint.max_length": 256,
        "sft_checkpoint.learning_rate": 3e-3})
    shutil.copytree(ROOT / "configs", repo / "configs")  # launcher configs are deps of the stage
    shutil.copytree(repo / "tiny_base", repo / "data" / "base_model")
    system = fake_params()["sft_dataset"]["system_prompt"]
    rows = [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": f"How do I sharpen kitchen knife number {i}?"},
                          {"role": "assistant", "content": f"<think>\nV.1 applies.\n</think>\nUse a whetstone, {i}."}]}
            for i in range(4)]
    (repo / "data" / "sft_dataset").mkdir(parents=True)
    (repo / "data" / "sft_dataset" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return repo


@pytest.mark.slow
def test_training_streams_into_a_dagster_run_and_dvc_sees_dvclive(tmp_path, monkeypatch):
    from dagster_project.build import build_definitions
    from dagster_project.resource import DvcCliResource

    for var in PIPES_ENV:
        monkeypatch.delenv(var, raising=False)
    repo = _sft_repo(tmp_path / "repo")
    defs = build_definitions(repo)
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(list(defs.assets), selection=["sft_checkpoint"], instance=instance,
                                resources={"dvc": DvcCliResource(project_dir=str(repo), env=tool_env(cwd=repo))})
        logged = [e.user_message for e in instance.all_logs(result.run_id)]
    assert result.success

    # one line per step reached the run log while DVC ran the stage, through the pipes session
    steps = [m for m in logged if m.startswith("sft_checkpoint step ")]
    assert [m.split(":")[0] for m in steps] == ["sft_checkpoint step 1/2", "sft_checkpoint step 2/2"], steps
    assert all("loss=" in m and "learning_rate=" in m for m in steps)
    assert not any("did not receive" in m for m in logged)
    (mat,) = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    assert mat.metadata["training/steps"].value == 2
    last = mat.metadata["training/last_step"].value
    live = json.loads((repo / "data/dvclive/sft_checkpoint/metrics.json").read_text())
    assert last["step"] == 2 and last["loss"] == pytest.approx(live["loss"])

    # DVC sees every key DVCLive logged: as metrics of the stage, and as plots, one file per key
    from dvc.repo import Repo  # `dvc metrics show`, in process (a DVC start costs seconds on a busy machine)

    with Repo(str(repo)) as dvc_repo:
        shown = dvc_repo.metrics.show()
    data = next(iter(shown.values()))["data"]["data/dvclive/sft_checkpoint/metrics.json"]["data"]
    assert {"loss", "learning_rate", "grad_norm", "mean_token_accuracy", "step"} <= set(data)
    assert data == live
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["sft_checkpoint"]
    outs = {o["path"] for o in lock["outs"]}
    assert {"data/dvclive/sft_checkpoint/metrics.json", "data/dvclive/sft_checkpoint/plots"} <= outs
    plots = repo / "data/dvclive/sft_checkpoint/plots/metrics"
    assert {p.name for p in plots.glob("*.tsv")} >= {"loss.tsv", "learning_rate.tsv", "grad_norm.tsv"}
    assert not (repo / "dvclive").exists() and not (repo / "data/plots").exists()
    times = json.loads((repo / "data/.work/timings/sft_checkpoint.json").read_text())
    assert times["train_s"] > 0 and "time" not in (repo / "data/metrics/sft_checkpoint.json").read_text()
    assert os.environ.get("DAGSTER_PIPES_CONTEXT") is None  # the session's variables went to DVC only
