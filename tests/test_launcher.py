"""The multi-GPU launch path, without GPUs: the accelerate/DeepSpeed configs parse, the launcher argv is what
`accelerate launch` accepts, and configurations that cannot work are refused before any compute.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipelines.errors import PipelineError
from pipelines.params.training import RlCheckpointParams, SftCheckpointParams
from pipelines.training_common import (
    DEFAULT_LAUNCHER_CONFIGS,
    LAUNCHED_ENV,
    REQUIRED_LAUNCHER_KEYS,
    LauncherConfig,
    launch_argv,
    launcher_config_path,
    preflight,
    read_launcher_config,
    relaunch,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"accelerate_ddp": ("MULTI_GPU", None), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_parse(name):
    path = ROOT / "configs" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert set(REQUIRED_LAUNCHER_KEYS) <= set(data)
    assert data["mixed_precision"] == "no"  # precision comes from params.yaml on the command line, not from here
    cfg = read_launcher_config(path)
    assert (cfg.distributed_type, cfg.zero_stage) == CONFIGS[name]
    # accelerate's own loader rejects unknown keys and bad enum values
    from accelerate.commands.config.config_args import ClusterConfig

    assert ClusterConfig.from_yaml_file(str(path)).distributed_type.value == CONFIGS[name][0]


def test_default_configs_exist():
    for rel in DEFAULT_LAUNCHER_CONFIGS.values():
        assert (ROOT / rel).is_file(), rel


def test_launch_argv_is_what_accelerate_launch_parses():
    argv = launch_argv("rl_checkpoint", "configs/zero3.yaml", "data/.work/rl_checkpoint/launch_params.yaml", 4, "bf16",
                       python="/venv/bin/python")
    assert argv == [
        "/venv/bin/python", "-m", "accelerate.commands.launch",
        "--config_file", "configs/zero3.yaml", "--num_processes", "4", "--mixed_precision", "bf16",
        "-m", "pipelines", "rl_checkpoint", "--params", "data/.work/rl_checkpoint/launch_params.yaml",
    ]
    from accelerate.commands.launch import launch_command_parser

    ns = launch_command_parser().parse_args(argv[3:])
    assert (ns.config_file, ns.num_processes, ns.mixed_precision) == ("configs/zero3.yaml", 4, "bf16")
    assert ns.module and ns.training_script == "pipelines"
    assert ns.training_script_args == ["rl_checkpoint", "--params", "data/.work/rl_checkpoint/launch_params.yaml"]
    assert launch_argv("sft_checkpoint", "c.yaml", "p.yaml", 1, "fp32")[0] == sys.executable
    assert "no" == launch_argv("sft_checkpoint", "c.yaml", "p.yaml", 1, "fp32")[8]
    with pytest.raises(PipelineError):
        launch_argv("sft_checkpoint", "c.yaml", "p.yaml", 0, "fp32")


def test_launcher_config_defaults_and_override():
    assert launcher_config_path(SftCheckpointParams()) is None
    gpu = dict(device="cuda", precision="bf16")
    assert launcher_config_path(SftCheckpointParams(launcher="deepspeed", **gpu)) == Path("configs/zero2.yaml")
    assert launcher_config_path(SftCheckpointParams(launcher="accelerate", **gpu)) == Path("configs/accelerate_ddp.yaml")
    chosen = SftCheckpointParams(launcher="deepspeed", launcher_config="configs/zero3.yaml", **gpu)
    assert launcher_config_path(chosen) == Path("configs/zero3.yaml")


def test_relaunch_only_from_the_outer_process(monkeypatch, tmp_path):
    # launcher python: train here, launch nothing
    assert relaunch("sft_checkpoint", None, SftCheckpointParams(), tmp_path) is False
    # inside our own launch the marker is set: train here too, never launch again
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    ddp = SftCheckpointParams(launcher="accelerate", device="cuda")
    assert relaunch("sft_checkpoint", None, ddp, tmp_path) is False
    assert not (tmp_path / "launch_params.yaml").exists()


DDP = LauncherConfig("configs/accelerate_ddp.yaml", "MULTI_GPU", None)
Z2 = LauncherConfig("configs/zero2.yaml", "DEEPSPEED", 2)
Z3 = LauncherConfig("configs/zero3.yaml", "DEEPSPEED", 3)
GPU = dict(device="cuda", precision="bf16")


@pytest.mark.parametrize(
    "section, facts, message",
    [
        # ZeRO-3 shards the weights, and LoRA adapters must be merged into unsharded weights for the output
        (SftCheckpointParams(launcher="deepspeed", lora={"enabled": True}, **GPU), dict(launcher_config=Z3),
         "lora.enabled with ZeRO-3"),
        (RlCheckpointParams(launcher="deepspeed", lora={"enabled": True}, **GPU), dict(launcher_config=Z3),
         "lora.enabled with ZeRO-3"),
        (SftCheckpointParams(launcher="deepspeed", **GPU), dict(launcher_config=Z2, deepspeed_installed=False),
         r"deepspeed is not installed \(pip install '.\[gpu\]'\)"),
        (SftCheckpointParams(launcher="deepspeed", **GPU), dict(launcher_config=DDP), "is not a DeepSpeed config"),
        (SftCheckpointParams(launcher="accelerate", **GPU), dict(launcher_config=Z2), "set launcher: deepspeed"),
        (SftCheckpointParams(launcher="accelerate", **GPU), dict(launcher_config=DDP, cuda=False),
         "device: 'cuda' but torch sees no CUDA"),
        (SftCheckpointParams(device="auto", precision="bf16"), dict(cuda=False), "precision: bf16 needs CUDA"),
        (SftCheckpointParams(launcher="deepspeed"), dict(launcher_config=Z2, cuda=False),
         r"zero2.yaml \(DEEPSPEED\) starts one process per GPU, but torch sees no CUDA"),
    ],
)
def test_preflight_refuses(section, facts, message):
    kwargs = dict(cuda=True, deepspeed_installed=True, launcher_config=None) | facts
    with pytest.raises(PipelineError, match=message):
        preflight(section, "sft_checkpoint", **kwargs)


@pytest.mark.parametrize(
    "section, cfg",
    [
        (SftCheckpointParams(), None),  # the CPU default
        (SftCheckpointParams(device="auto"), None),
        (SftCheckpointParams(launcher="deepspeed", lora={"enabled": True}, **GPU), Z2),  # LoRA + ZeRO-2 is fine
        (SftCheckpointParams(launcher="deepspeed", **GPU), Z3),  # full fine-tuning + ZeRO-3 is fine
        (RlCheckpointParams(launcher="accelerate", **GPU), DDP),
    ],
)
def test_preflight_accepts(section, cfg):
    preflight(section, "sft_checkpoint", cuda=cfg is not None, deepspeed_installed=True, launcher_config=cfg)


def test_params_refuse_impossible_combinations():
    from pipelines.params import parse_params

    base = {"categories": ["violence"], "paths": {"spec": str(ROOT / "data" / "spec"), "prompts": str(ROOT)}}
    with pytest.raises(PipelineError, match="rl_checkpoint: precision 'fp16' needs a GPU"):
        parse_params(base | {"rl_checkpoint": {"precision": "fp16"}})
    with pytest.raises(PipelineError, match="sft_checkpoint.launcher: Input should be"):
        parse_params(base | {"sft_checkpoint": {"launcher": "torchrun"}})


def test_bad_launcher_config_files(tmp_path):
    with pytest.raises(PipelineError, match="launcher config not found"):
        read_launcher_config(tmp_path / "none.yaml")
    partial = tmp_path / "partial.yaml"
    partial.write_text("distributed_type: DEEPSPEED\n")
    with pytest.raises(PipelineError, match="missing key"):
        read_launcher_config(partial)
    no_stage = tmp_path / "no_stage.yaml"
    no_stage.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 2\n"
                        "mixed_precision: 'no'\ndeepspeed_config: {offload_param_device: none}\n")
    with pytest.raises(PipelineError, match="zero_stage"):
        read_launcher_config(no_stage)


def test_stage_relaunches_itself_under_accelerate_launch(tmp_path, monkeypatch):
    """End to end on CPU: `main` re-runs `python -m pipelines sft_checkpoint` under `accelerate launch` with a
    one-process CPU config; the child trains (it sees the marker and does not launch again) and writes the outputs."""
    import json
    import os

    from pipelines import sft_checkpoint
    from pipelines.params import DEFAULT_SYSTEM_PROMPT, parse_params
    from pipelines.training_common import build_tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: one thread is fastest
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    build_tiny_checkpoint("data/base_model")
    row = {"messages": [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "How do I sharpen a knife?"},
        {"role": "assistant", "content": "<think>\nV.1: ordinary request.\n</think>\nUse a whetstone."},
    ]}
    Path("data/sft_dataset").mkdir(parents=True)
    Path("data/sft_dataset/train.jsonl").write_text((json.dumps(row) + "\n") * 4)
    Path("spec").mkdir()
    Path("prompts").mkdir()
    Path("cpu.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nmixed_precision: 'no'\n"
        "use_cpu: true\nnum_machines: 1\nmachine_rank: 0\ndebug: false\n"
    )
    params = parse_params({
        "categories": ["violence"],
        "paths": {"spec": "spec", "prompts": "prompts", "work": "work"},
        "sft_checkpoint": {"launcher": "accelerate", "launcher_config": "cpu.yaml", "epochs": 2, "max_steps": 2},
    })
    assert sft_checkpoint.main(params) is None  # this process only launched
    metrics = json.loads(Path("data/metrics/sft_checkpoint.json").read_text())
    assert metrics["steps"] == 2
    assert Path("data/sft_checkpoint/model.safetensors").is_file()
    assert Path("data/dvclive/sft_checkpoint/plots/metrics/loss.tsv").read_text().startswith("step\tloss")
