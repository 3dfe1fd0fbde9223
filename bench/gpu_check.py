"""The GPU path of issue 22, measured: DeepSpeed ZeRO-2/ZeRO-3 SFT and vLLM generation inside Dagster materializations.

    bash bench/gpu_check.sh                       # install the GPU extra, then run this (the usual entry point)
    python bench/gpu_check.py --dry-run           # print every command line and params overlay; no GPU needed
    python bench/gpu_check.py --cpu-smoke         # rehearse the harness on CPU (launcher python, 2 steps)
    python bench/gpu_check.py --pack-wheels .whl  # (machine with PyPI) wheels for an offline GPU machine

Steps, in order (each a real Dagster materialization of the project's assets, except `prep`):
  prep                   `dvc repro sft_dataset` in the work copy: base_model (the embedded SmolLM2-135M GGUF,
                         `python -m pipelines base_model`), spec, fake-generator CoTs, judge, SFT rows
  sft_zero2              materialize sft_checkpoint, launcher deepspeed + configs/zero2.yaml, bf16, cuda
  sft_zero3              the same with configs/zero3.yaml
  raw_cots_transformers  materialize raw_cots[<category>] with the transformers backend on cuda
  raw_cots_vllm          the same prompts through the `openai` backend against `vllm serve` on 127.0.0.1
  grpo_vllm              rl_checkpoint with TRL's vLLM generation, only if pipelines/params accepts `use_vllm`
After each training step the checkpoint is reloaded here and asked for a short answer (the text goes in the JSON).

Why a work copy: every step needs a different params.yaml. Editing the checkout's params.yaml and restoring it
afterwards leaves it modified if the run is killed, and races with anyone else working in the checkout; `dvc exp run
-S` would write experiment refs and a dvc.lock into the checkout. So the project's files (tracked and untracked but
not ignored, i.e. what git would see) are copied to a temporary directory, params.yaml there is the checkout's plus
the step's overlays from configs/gpu_check/, and DVC, Dagster and the checkpoints all live there. The checkout only
gains bench/results/ (this JSON; gpu_check.sh adds its log and install record).

Figures per step: wall time; tokens/s; MFU = model FLOPs / time / peak (6 x parameters per trained token,
2 x parameters per generated token; peak dense bf16 FLOP/s from PEAK_BF16_FLOPS by torch.cuda.get_device_name(),
times the GPUs used); peak GPU memory (NVML or nvidia-smi sampled every 0.2 s while a step's subprocesses run, minus
what was in use before it; torch.cuda.max_memory_allocated for the reload done in this process).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_check.py` from anywhere: the project's packages are importable
    sys.path.insert(0, str(ROOT))

from pipelines import catalog  # noqa: E402  (paths only: importable before the device wheels are in)

# the checkpoint and metrics file of each training stage, relative to the work copy
TRAINED = {"sft_checkpoint": (catalog.SFT_CHECKPOINT, catalog.SFT_CHECKPOINT_METRICS),
           "rl_checkpoint": (catalog.RL_CHECKPOINT, catalog.RL_CHECKPOINT_METRICS)}
OVERLAY_DIR = Path("configs/gpu_check")  # relative to the project root, as printed in commands and errors
DEFAULT_OUT = Path("bench/results/gpu_check.json")
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "gpu_check_work"
WHEELS_FILE = OVERLAY_DIR / "device_wheels.txt"
STAGE_ENV = {  # stage subprocesses: never reach for a hub (the GPU machine is offline), no tokenizer thread pools
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1",
    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
}

# Dense (no sparsity) bf16 tensor-core peak per GPU, from the vendors' data sheets (SXM parts unless named).
# Matched as substrings of torch.cuda.get_device_name(), longest first, so "H100 PCIe" wins over "H100".
PEAK_BF16_FLOPS: Dict[str, float] = {
    "GB200": 2500e12, "B200": 2250e12, "H200": 989e12, "GH200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H100": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 6000 Ada": 364e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "A6000": 155e12,
}


class OverlayError(Exception):
    """A params overlay that does not validate, or a step that cannot be planned; the message names the file."""


# ------------------------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class Step:
    name: str
    title: str
    overlays: Tuple[str, ...]  # file names in configs/gpu_check/, applied after base.yaml, in order
    asset: Optional[str] = None  # the Dagster asset materialized (None: prep, run by DVC directly)
    partitioned: bool = False  # the asset has one partition per category
    kind: str = "other"  # train | generate | other: which figures apply
    gated: bool = False  # runs only if its overlay validates (a capability the params schema may not have yet)
    needs_vllm: bool = False


STEPS: Tuple[Step, ...] = (
    Step("prep", "data for SFT: dvc repro sft_dataset (base_model from the embedded GGUF, fake-generator CoTs)", ()),
    Step("sft_zero2", "SFT, launcher deepspeed, configs/zero2.yaml, bf16, cuda", ("sft_zero2.yaml",),
         asset="sft_checkpoint", kind="train"),
    Step("sft_zero3", "SFT, launcher deepspeed, configs/zero3.yaml, bf16, cuda", ("sft_zero3.yaml",),
         asset="sft_checkpoint", kind="train"),
    Step("raw_cots_transformers", "raw_cots, transformers backend on cuda", ("raw_cots_transformers.yaml",),
         asset="raw_cots", partitioned=True, kind="generate"),
    Step("raw_cots_vllm", "raw_cots, openai backend -> vllm serve on 127.0.0.1 (same prompts)", ("raw_cots_vllm.yaml",),
         asset="raw_cots", partitioned=True, kind="generate", needs_vllm=True),
    Step("grpo_vllm", "rl_checkpoint (GRPO) with TRL's vLLM generation", ("grpo_vllm.yaml",),
         asset="rl_checkpoint", kind="train", gated=True, needs_vllm=True),
)
STEP_NAMES = tuple(s.name for s in STEPS)
# Rough device seconds per step (start-up included), used only to skip steps that would overrun --budget-s.
# Guesses for one H100/H200-class GPU and a 16-core host (prep trains the small refusal classifier on CPU); a step
# whose guess no longer fits is skipped and the JSON says so, rather than the whole run hitting a hard time limit.
STEP_ESTIMATE_S = {"prep": 90, "sft_zero2": 75, "sft_zero3": 75, "raw_cots_transformers": 30, "raw_cots_vllm": 120,
                   "grpo_vllm": 120}


# ------------------------------------------------------------------------------------------------ overlays
def deep_merge(base: Any, over: Any) -> Any:
    """`over` on top of `base`: mappings merge key by key, anything else is replaced.

    A mapping whose `kind` differs from the base's (a backend: transformers -> openai) replaces the base mapping
    whole: merging would keep keys of the old kind (`device`, `dtype`) that the new kind's schema rejects.
    """
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return copy.deepcopy(over)
    if "kind" in over and over.get("kind") != base.get("kind"):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if k in out else copy.deepcopy(v)
    return out


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; for printing what an overlay changes."""
    if not isinstance(d, dict) or not d:
        return {prefix: d} if prefix else {}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OverlayError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise OverlayError(f"{path}: invalid YAML: {getattr(e, 'problem', e)}") from None


class _chdir:
    """The params schema checks paths (data/spec, data/prompts) relative to the working directory."""

    def __init__(self, path: Path) -> None:
        self.path, self.old = path, None

    def __enter__(self) -> None:
        self.old = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc: object) -> None:
        os.chdir(self.old)


def compose_params(root: Path, layers: Sequence[Tuple[str, Any]]) -> Dict[str, Any]:
    """params.yaml of `root` with each (label, overlay mapping) merged on in turn, validated after every layer.

    Validating layer by layer means an error names the overlay that introduced the bad key, not just "the result".

    Raises:
        OverlayError: `<overlay>: <dotted key>: <problem>` (the project's own one-line message).
    """
    from pipelines.errors import PipelineError
    from pipelines.params import parse_params

    params = read_yaml(root / "params.yaml", "params.yaml")
    with _chdir(root):
        try:
            parse_params(params, "params.yaml")
        except PipelineError as e:
            raise OverlayError(f"the checkout's own params.yaml does not validate: {e}") from None
        for label, overlay in layers:
            if overlay is None:
                continue
            if not isinstance(overlay, dict):
                raise OverlayError(f"{label}: a params overlay must be a mapping of sections")
            params = deep_merge(params, overlay)
            try:
                parse_params(params, label)
            except PipelineError as e:
                raise OverlayError(str(e)) from None
    return params


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class PlannedStep:
    step: Step
    overlay_files: List[str]
    params: Optional[Dict[str, Any]] = None  # the full params.yaml of the step's work copy
    changes: Dict[str, Any] = field(default_factory=dict)  # dotted keys the overlays set
    commands: Dict[str, Any] = field(default_factory=dict)  # what will run per role: an argv, or Dagster's call
    skip: Optional[str] = None  # why the step will not run


def smoke_overlays(root: Path) -> Dict[str, Any]:
    data = read_yaml(root / OVERLAY_DIR / "cpu_smoke.yaml", "CPU smoke overlay") or {}
    unknown = sorted(set(data) - set(STEP_NAMES))
    if unknown:
        raise OverlayError(f"{OVERLAY_DIR / 'cpu_smoke.yaml'}: unknown step(s) {', '.join(unknown)} "
                           f"(steps: {', '.join(STEP_NAMES)})")
    return data


def stage_command(root: Path, stage: str, category: str) -> str:
    """The `cmd` dvc.yaml gives the stage, with a foreach item filled in."""
    spec = (read_yaml(root / "dvc.yaml", "dvc.yaml") or {}).get("stages", {}).get(stage)
    if spec is None:
        raise OverlayError(f"dvc.yaml: no stage {stage!r}")
    cmd = spec["do"]["cmd"] if "foreach" in spec else spec["cmd"]
    return str(cmd).replace("${item}", category).replace("${key}", category)


def visible_gpus() -> int:
    """GPUs nvidia-smi lists, without importing torch (the dry run must stay cheap); 0 when there is none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for ln in out.splitlines() if ln.startswith("GPU "))


def vllm_server_argv(model_dir: str, generator: Dict[str, Any], gpu_memory_utilization: float,
                     python: str = sys.executable) -> List[str]:
    """`vllm serve` as `python -m vllm.entrypoints.openai.api_server` (no PATH lookup), on the host, port and model
    name of the step's own `raw_cots.generator` overlay. Only flags that every recent vLLM accepts."""
    url = urllib.parse.urlparse(generator["base_url"])
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", str(generator["model"]), "--host", url.hostname or "127.0.0.1",
            "--port", str(url.port or 8000), "--dtype", "bfloat16",
            "--gpu-memory-utilization", str(gpu_memory_utilization), "--max-model-len", "4096", "--seed", "0"]


def plan(args: argparse.Namespace, root: Path = ROOT) -> List[PlannedStep]:
    """Every selected step with its validated params, the overlay keys it changes and the exact commands.

    Pure apart from reading the project's files (and `nvidia-smi -L` for the process count): no GPU, no torch.

    Raises:
        OverlayError: an overlay (or --extra-overlay) that does not validate, for a step that is not gated.
    """
    from dagster_project.dvc_cli import dvc_argv
    from pipelines.errors import PipelineError
    from pipelines.training_common import launch_argv, launcher_config_path, preflight, read_launcher_config

    smoke = smoke_overlays(root) if args.cpu_smoke else {}
    extra = [(str(p), read_yaml(Path(p), "extra overlay")) for p in args.extra_overlay]
    base_file = str(OVERLAY_DIR / "base.yaml")
    category_layer = ("--category", {"categories": [args.category]})
    base_layers = [(base_file, read_yaml(root / base_file, "overlay")), category_layer]
    gpus = visible_gpus()
    out: List[PlannedStep] = []
    for step in STEPS:
        if step.name not in args.steps:
            continue
        files = [base_file] + [str(OVERLAY_DIR / f) for f in step.overlays]
        layers = base_layers + [(f, read_yaml(root / f, "overlay")) for f in files[1:]]
        if step.name in smoke:
            layers.append((f"{OVERLAY_DIR / 'cpu_smoke.yaml'} ({step.name})", smoke[step.name]))
        layers += extra
        ps = PlannedStep(step, files)
        try:
            ps.params = compose_params(root, layers)
        except OverlayError as e:
            if not step.gated:
                raise
            ps.skip = f"not supported by params: {e}"
            out.append(ps)
            continue
        for _, layer in layers[len(base_layers):]:  # what this step sets beyond base.yaml (printed once)
            ps.changes.update(flatten(layer))
        if args.cpu_smoke and step.needs_vllm:
            ps.skip = "--cpu-smoke: vLLM needs a GPU"
        elif args.no_vllm and step.needs_vllm:
            ps.skip = "--no-vllm"

        # what runs: Dagster -> `python -m dvc repro --single-item <item>` -> the dvc.yaml command -> (relaunch)
        if step.asset is None:
            ps.commands["dvc"] = dvc_argv(["repro", "sft_dataset"])
        else:
            item = f"{step.asset}@{args.category}" if step.partitioned else step.asset
            part = f", partition_key={args.category!r}" if step.partitioned else ""
            ps.commands["dagster"] = (f"dagster.materialize(defs.assets, selection=[{step.asset!r}]{part}, "
                                      "resources={'dvc': DvcCliResource(project_dir=<work copy>)})")
            ps.commands["dvc"] = dvc_argv(["repro", "--single-item", item])
            ps.commands["stage"] = shlex.split(stage_command(root, step.asset, args.category))
        if step.kind == "train" and step.asset is not None:
            from pipelines.params import parse_params

            with _chdir(root):
                section = getattr(parse_params(ps.params), step.asset)
                cfg_path = launcher_config_path(section)
                if cfg_path is not None:
                    # Checked here as the GPU machine will check it (CUDA present, deepspeed installed), so a missing
                    # config or a bad pairing (ZeRO-3 + LoRA, a DDP config under launcher deepspeed) fails now.
                    try:
                        cfg = read_launcher_config(cfg_path)
                        preflight(section, step.asset, cuda=True, deepspeed_installed=True, launcher_config=cfg)
                    except PipelineError as e:  # one line naming the key or the file
                        raise OverlayError(f"{files[-1]}: {e}") from None
                    n = section.num_processes or max(1, gpus)
                    ps.commands["relaunch"] = launch_argv(
                        step.asset, cfg_path, Path(ps.params["paths"]["work"]) / step.asset / "launch_params.yaml",
                        n, section.precision)
        if step.needs_vllm and step.asset == "raw_cots" and ps.params is not None:
            ps.commands["vllm_server"] = vllm_server_argv(
                catalog.BASE_MODEL.as_posix(), ps.params["raw_cots"]["generator"], args.vllm_gpu_memory_utilization)
        out.append(ps)
    return out


def command_text(cmd: Any) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def print_plan(steps: Sequence[PlannedStep], args: argparse.Namespace, stream=sys.stdout) -> None:
    w = stream.write
    w(f"work copy: {args.workdir} (the project's git-visible files; params.yaml = checkout's + overlays)\n")
    w(f"results:   {args.out}\n")
    w(f"mode:      {'CPU smoke (harness rehearsal, not a benchmark)' if args.cpu_smoke else 'GPU'}; "
      f"budget {'none' if math.isinf(args.budget_s) else f'{args.budget_s:.0f} s'}\n")
    base = read_yaml(ROOT / OVERLAY_DIR / "base.yaml", "overlay") or {}
    w(f"every step: {OVERLAY_DIR / 'base.yaml'} + --category {args.category}:\n")
    for k, v in {**flatten(base), "categories": [args.category]}.items():
        w(f"            {k} = {json.dumps(v)}\n")
    w("\n")
    for ps in steps:
        w(f"[{ps.step.name}] {ps.step.title}\n")
        w(f"  overlays:    {', '.join(ps.overlay_files)} + --category\n")
        if ps.skip:
            w(f"  SKIP:        {ps.skip}\n\n")
            continue
        w("  params:      valid (pipelines.params)\n")
        for k, v in ps.changes.items():
            w(f"               {k} = {json.dumps(v)}\n")
        for role in ("vllm_server", "dagster", "dvc", "stage", "relaunch"):
            if role in ps.commands:
                w(f"  {role + ':':<13}{command_text(ps.commands[role])}\n")
        if ps.step.kind == "train":
            w(f"  then:        reload {TRAINED[ps.step.asset][0].as_posix()} on {'cpu' if args.cpu_smoke else 'cuda'}, "
              f"generate {args.answer_tokens} tokens\n")
        w("\n")


# ------------------------------------------------------------------------------------------------ measuring
def peak_flops_for(device_name: str) -> Tuple[Optional[float], Optional[str]]:
    """(peak dense bf16 FLOP/s, table key) for a GPU name; (None, None) when it is not in the table."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key], key
    return None, None


def mfu(flops_per_token: float, tokens: float, seconds: float, peak: Optional[float], gpus: int = 1) -> Optional[float]:
    if not peak or not seconds or not tokens:
        return None
    return round(flops_per_token * tokens / seconds / (peak * max(1, gpus)), 6)


class GpuMemorySampler:
    """Peak GPU memory in use (all GPUs, every process) while a block runs, sampled from NVML, else nvidia-smi.

    The steps run in subprocesses (DVC -> the stage -> accelerate launch -> workers, or a vLLM server), which
    torch.cuda.max_memory_allocated in this process cannot see; the device-wide reading can. The reading before
    the block is the baseline and is subtracted.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.source: Optional[str] = None
        self._nvml = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.baseline: Optional[int] = None
        self.peak: Optional[int] = None
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.source = "nvml"
        except Exception:  # noqa: BLE001 - no NVML library or no driver: try the CLI
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"

    def read(self) -> Optional[int]:
        """Bytes in use summed over the GPUs, or None."""
        try:
            if self._nvml is not None:
                n = self._nvml.nvmlDeviceGetCount()
                return sum(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(i)).used
                           for i in range(n))
            if self.source == "nvidia-smi":
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                return sum(int(x) for x in out.split()) << 20
        except Exception:  # noqa: BLE001 - a failed sample is a missing sample
            return None
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            v = self.read()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)

    def __enter__(self) -> "GpuMemorySampler":
        if self.source:
            self.baseline = self.peak = self.read()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def result(self) -> Dict[str, Any]:
        if self.peak is None:
            return {"peak_gpu_mem_mib": None, "gpu_mem_source": self.source}
        return {"peak_gpu_mem_mib": round((self.peak - (self.baseline or 0)) / 2**20, 1),
                "peak_gpu_mem_total_mib": round(self.peak / 2**20, 1), "gpu_mem_source": self.source}


def jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return str(v)[:500]


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def package_versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate", "deepspeed", "vllm", "peft", "datasets", "dagster",
                 "dvc", "pydantic"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_info(peak_override: Optional[float]) -> Dict[str, Any]:
    info: Dict[str, Any] = {"cuda": False, "count": 0, "name": None}
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info.update(cuda=True, count=torch.cuda.device_count(), name=torch.cuda.get_device_name(0),
                        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                        memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    except Exception as e:  # noqa: BLE001 - recorded, the steps will fail on their own
        info["error"] = f"{type(e).__name__}: {e}"
    peak, key = peak_flops_for(info["name"] or "")
    if peak_override:
        peak, key = peak_override, "--peak-flops"
    info.update(peak_bf16_flops=peak, peak_source=key)
    if shutil.which("nvidia-smi"):
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# ------------------------------------------------------------------------------------------------ the work copy
EXCLUDED_TOP = {".git", ".venv", ".whl", ".gl", "dagster_home", "build", ".pytest_cache"}
KEPT_DATA = {"spec", "prompts", "evals"}  # data/ holds human-edited inputs and DVC outputs; only inputs are copied


def project_files(root: Path) -> List[str]:
    """Relative paths of the files git sees (tracked + untracked-not-ignored); a walk with the same exclusions when
    the copy has no .git (the GPU machine may receive the files without it)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True, timeout=60).stdout.decode()
        rels = [p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        rels = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            parts = rel_dir.parts
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")
                           and not (not parts and d in EXCLUDED_TOP)
                           and not (parts == ("data",) and d not in KEPT_DATA)]
            rels += [str(rel_dir / f) for f in filenames if not f.endswith(".pyc")]
    return sorted(p for p in rels if not p.startswith("bench/results/") and (root / p).is_file())


def prepare_workdir(root: Path, workdir: Path, fresh: bool) -> Dict[str, Any]:
    """Copy the project into `workdir` (again: updated code is picked up, DVC reruns what it changes) and make it a
    DVC project of its own: git when there is a git binary, else DVC's no-SCM mode."""
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = project_files(root)
    for rel in files:
        dst = workdir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dst)
    scm = "git"
    if not (workdir / ".git").exists():
        if shutil.which("git"):
            subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
        else:
            scm = "none"
    if scm == "none" or not (workdir / ".dvc").is_dir():
        from configobj import ConfigObj  # a dvc dependency

        (workdir / ".dvc").mkdir(exist_ok=True)
        cfg = ConfigObj(str(workdir / ".dvc" / "config"))
        if scm == "none":
            cfg.setdefault("core", {})["no_scm"] = "true"
        cfg.write()
    return {"path": str(workdir), "files": len(files), "scm": scm}


def write_step_params(workdir: Path, params: Dict[str, Any]) -> None:
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ running a step
class Runner:
    """Runs the planned steps in the work copy and fills the result JSON, writing it after every step."""

    def __init__(self, args: argparse.Namespace, steps: List[PlannedStep], result: Dict[str, Any]) -> None:
        self.args = args
        self.steps = steps
        self.result = result
        self.workdir = Path(args.workdir)
        self.t0 = time.monotonic()
        self.gpu = result["gpu"]
        self.device = "cpu" if args.cpu_smoke else "cuda"
        self.n_params: Optional[int] = None
        self._instance = None

    # -- plumbing
    def save(self) -> None:
        self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_json_atomic(Path(self.args.out), self.result)
        if self.args.mirror_dir:  # written after every step: a run killed at its time limit still leaves its figures
            write_json_atomic(Path(self.args.mirror_dir) / Path(self.args.out).name, self.result)

    def dvc_resource(self):
        from dagster_project.resource import DvcCliResource

        return DvcCliResource(project_dir=str(self.workdir), env=dict(STAGE_ENV))

    def instance(self):
        import dagster as dg

        if self._instance is None:
            home = self.workdir / "dagster_home"  # git-ignored in the project; a plain instance, as the tests use
            home.mkdir(exist_ok=True)
            self._instance = dg.DagsterInstance.from_config(str(home))
        return self._instance

    def materialize(self, ps: PlannedStep) -> Dict[str, Any]:
        """One Dagster materialization of the step's asset (partition = the category for per-category assets)."""
        import dagster as dg

        from dagster_project.build import build_definitions

        defs = build_definitions(self.workdir)  # re-read: params.yaml (the partitions) changed for this step
        kwargs = {"partition_key": self.args.category} if ps.step.partitioned else {}
        res = dg.materialize(list(defs.assets), selection=[ps.step.asset], instance=self.instance(),
                             resources={"dvc": self.dvc_resource()}, raise_on_error=False, **kwargs)
        out: Dict[str, Any] = {"run_id": res.run_id, "success": res.success}
        mats = [e.event_specific_data.materialization for e in res.get_asset_materialization_events()]
        out["materializations"] = [{"asset": m.asset_key.to_user_string(), "partition": m.partition,
                                    "data_version": (m.tags or {}).get("dagster/data_version"),
                                    "metadata": {k: jsonable(getattr(v, "value", v)) for k, v in m.metadata.items()}}
                                   for m in mats]
        out["checks"] = [{"check": c.check_name, "passed": c.passed, "partition": getattr(c, "partition", None),
                          "metadata": {k: jsonable(getattr(v, "value", v)) for k, v in (c.metadata or {}).items()}}
                         for c in res.get_asset_check_evaluations()]
        failures = [e.event_specific_data.error.message.strip() for e in res.all_events
                    if e.is_step_failure and getattr(e.event_specific_data, "error", None)]
        if failures:
            out["errors"] = [f[-1500:] for f in failures]
        # The stage's own log lines that show what really ran (the relaunch command, DeepSpeed's ZeRO set-up).
        evidence = re.compile(r"launching \d+ process|accelerate\.commands\.launch|DeepSpeed|ZeRO|zero_stage|"
                              r"Running stage|error", re.I)
        lines = [e.user_message for e in self.instance().all_logs(res.run_id) if e.user_message]
        out["log_evidence"] = [ln[:300] for ln in lines if evidence.search(ln)][:40]
        return out

    def parameters(self) -> Optional[int]:
        if self.n_params is None:
            src = read_json(self.workdir / catalog.BASE_MODEL / "source.json") or {}
            self.n_params = src.get("parameters")
        return self.n_params

    # -- steps
    def run(self) -> int:
        failed = 0
        for ps in self.steps:
            rec: Dict[str, Any] = {"step": ps.step.name, "title": ps.step.title, "overlays": ps.overlay_files,
                                   "changes": ps.changes,
                                   "commands": {k: command_text(v) for k, v in ps.commands.items()}}
            self.result["steps"].append(rec)
            elapsed = time.monotonic() - self.t0
            if ps.skip:
                rec.update(status="skipped", reason=ps.skip)
            elif ps.step.needs_vllm and not self.result["vllm"]["available"]:
                rec.update(status="skipped", reason=f"vllm unavailable: {self.result['vllm']['reason']}")
            elif elapsed + STEP_ESTIMATE_S.get(ps.step.name, 60) > self.args.budget_s and ps.step.name != "prep":
                rec.update(status="skipped", reason=f"budget: {elapsed:.0f} s used of --budget-s "
                                                    f"{self.args.budget_s:.0f}, step needs ~{STEP_ESTIMATE_S[ps.step.name]} s")
            else:
                print(f"\n=== gpu_check: {ps.step.name}: {ps.step.title}", flush=True)
                write_step_params(self.workdir, ps.params)
                t = time.monotonic()
                try:
                    getattr(self, f"step_{ps.step.kind}" if ps.step.asset else "step_prep")(ps, rec)
                except Exception as e:  # noqa: BLE001 - one failed step is recorded; the others still run
                    rec.setdefault("status", "failed")
                    rec["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
                rec["wall_s"] = round(time.monotonic() - t, 1)
                rec.setdefault("status", "ok")
                failed += rec["status"] == "failed"
                print(f"=== gpu_check: {ps.step.name}: {rec['status']} in {rec['wall_s']} s"
                      + (f" ({rec.get('error') or rec.get('reason')})" if rec["status"] != "ok" else ""), flush=True)
            self.save()
            if ps.step.name == "prep" and rec["status"] != "ok":
                for rest in self.steps[self.steps.index(ps) + 1:]:
                    self.result["steps"].append({"step": rest.step.name, "status": "skipped",
                                                 "reason": "prep failed: no base model / SFT data"})
                break
        self.result["summary"] = summarize(self.result)
        self.save()
        return 1 if failed else 0

    def step_prep(self, ps: PlannedStep, rec: Dict[str, Any]) -> None:
        from dagster_project.dvc_cli import run_dvc

        with GpuMemorySampler() as mem:
            run = run_dvc(["repro", "sft_dataset"], self.workdir, lambda ln: print(ln, flush=True),
                          env=dict(STAGE_ENV), check=False)
        rec.update(mem.result())
        rec["dvc"] = {"returncode": run.returncode, "ran": run.ran, "reused": run.reused}
        if run.returncode != 0:
            rec["status"] = "failed"
            rec["error"] = " | ".join(ln for ln in run.lines[-8:] if ln.strip())[-1500:]
            return
        rec["base_model"] = read_json(self.workdir / catalog.BASE_MODEL / "source.json")
        rec["sft_dataset"] = read_json(self.workdir / catalog.SFT_DATASET_METRICS)

    def step_train(self, ps: PlannedStep, rec: Dict[str, Any]) -> None:
        stage = ps.step.asset
        with GpuMemorySampler() as mem:
            rec["dagster"] = self.materialize(ps)
        rec.update(mem.result())
        if not rec["dagster"]["success"]:
            rec["status"] = "failed"
            rec["error"] = "; ".join(rec["dagster"].get("errors", [])) or "Dagster run failed"
            return
        checkpoint, metrics_file = (self.workdir / p for p in TRAINED[stage])
        metrics = read_json(metrics_file) or {}
        summary = read_json(checkpoint / "training_summary.json") or {}
        rec["metrics"] = metrics
        rec["world_size"] = world = int(summary.get("world_size") or 1)
        rec["launcher"] = {k: (summary.get("params") or {}).get(k) for k in ("launcher", "launcher_config", "precision",
                                                                             "device")}
        tokens = metrics.get("tokens_seen")
        # the training time is kept out of the metrics (a DVC out) and recorded under paths.work (pipelines/timings.py)
        secs = (read_json(self.workdir / "data/.work/timings" / f"{stage}.json") or {}).get("train_s")
        n = self.parameters()
        if tokens and secs:
            rec["tokens_per_s"] = round(tokens / secs, 1)
            if n:
                rec["mfu"] = mfu(6 * n, tokens, secs, self.gpu.get("peak_bf16_flops"), world)
                rec["mfu_basis"] = f"6 x {n} params x {tokens} tokens / {secs:.2f} s / ({world} x peak)"
        cfg = read_json(checkpoint / "config.json") or {}
        rec["saved_dtype"] = cfg.get("dtype") or cfg.get("torch_dtype")
        rec["reload"] = reload_and_generate(checkpoint, self.workdir, ps.params, self.args.category,
                                            self.device, self.args.answer_tokens)
        if not rec["reload"].get("ok"):
            rec["status"] = "failed"
            rec["error"] = f"reload: {rec['reload'].get('error')}"

    def step_generate(self, ps: PlannedStep, rec: Dict[str, Any]) -> None:
        server = None
        gen = ps.params["raw_cots"]["generator"]
        try:
            with GpuMemorySampler() as mem:
                if ps.step.needs_vllm:
                    t = time.monotonic()
                    server = VllmServer(ps.commands["vllm_server"], self.workdir, gen["base_url"],
                                        self.args.vllm_start_timeout_s)
                    server.start()
                    rec["server_start_s"] = round(time.monotonic() - t, 1)
                    rec["memory_note"] = ("vLLM reserves --gpu-memory-utilization of the GPU up front: its peak is "
                                          "that reservation, not what the 135M model needs")
                rec["dagster"] = self.materialize(ps)
            rec.update(mem.result())
        finally:
            if server is not None:
                rec["server_log_tail"] = server.stop()
        if not rec["dagster"]["success"]:
            rec["status"] = "failed"
            rec["error"] = "; ".join(rec["dagster"].get("errors", [])) or "Dagster run failed"
            return
        cat = self.args.category
        metrics = read_json(self.workdir / catalog.raw_cots_metrics(cat)) or {}
        rec["metrics"] = metrics
        rows = [json.loads(ln) for ln in (self.workdir / catalog.raw_cots(cat)).read_text().splitlines()
                if ln.strip()]
        tokens = generated_tokens(self.workdir / catalog.BASE_MODEL, rows)
        rec["generated_tokens"] = tokens
        rec["samples"] = [{"prompt_id": r.get("prompt_id"), "raw": (r.get("raw") or "")[:400]} for r in rows[:2]]
        # the stage's time is kept out of its metrics (a DVC out) and recorded under paths.work (pipelines/timings.py)
        secs = (read_json(self.workdir / "data/.work/timings" / f"raw_cots@{cat}.json") or {}).get("wall_s")
        if tokens and secs:
            rec["tokens_per_s"] = round(tokens / secs, 1)
            rec["tokens_per_s_basis"] = ("generated tokens / the stage's wall_s (includes loading the model for "
                                         "transformers; the vLLM server start is server_start_s, not included)")
            n = self.parameters()
            if n:
                rec["mfu"] = mfu(2 * n, tokens, secs, self.gpu.get("peak_bf16_flops"))
                rec["mfu_basis"] = "2 x params x generated tokens (prompt tokens not counted) / wall_s / peak"


def generated_tokens(model_dir: Path, rows: List[Dict[str, Any]]) -> Optional[int]:
    """Tokens the generator wrote: each row's `raw` minus the prefill every row of the category starts with (the
    `<think>` + category line) and minus the `</think>` line the pipeline inserts between the two phases."""
    raws = [r.get("raw") or "" for r in rows]
    if not raws:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # noqa: BLE001 - no tokenizer: no token count
        return None
    head = os.path.commonprefix(raws)
    n_head = len(tok(head, add_special_tokens=False)["input_ids"]) if head else 0
    n_close = len(tok("\n</think>\n", add_special_tokens=False)["input_ids"])
    total = 0
    for r in raws:
        n = len(tok(r, add_special_tokens=False)["input_ids"]) - n_head
        total += max(0, n - (n_close if "</think>" in r[len(head):] else 0))
    return total


def reload_and_generate(ckpt: Path, workdir: Path, params: Dict[str, Any], category: str, device: str,
                        max_new_tokens: int) -> Dict[str, Any]:
    """Load the checkpoint the step just wrote, as a user would, and ask it one training-style question (spec-free
    system prompt, the category's first prompt), greedy. The text goes in the JSON."""
    out: Dict[str, Any] = {"checkpoint": str(ckpt.relative_to(workdir)), "device": device}
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        prompt = json.loads((workdir / "data/prompts" / f"{category}.jsonl").read_text().splitlines()[0])["prompt"]
        conv = [{"role": "system", "content": params["sft_dataset"]["system_prompt"]},
                {"role": "user", "content": prompt}]
        cuda = device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.monotonic()
        tok = AutoTokenizer.from_pretrained(str(ckpt))
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16 if cuda else torch.float32,
                                                     use_safetensors=True).to(device).eval()
        out["load_s"] = round(time.monotonic() - t, 2)
        out["params"] = sum(p.numel() for p in model.parameters())
        out["weights_finite"] = bool(all(torch.isfinite(p).all() for p in model.parameters()))
        enc = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        t = time.monotonic()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.1,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = gen[0, enc["input_ids"].shape[1]:]
        out["generate_s"] = round(time.monotonic() - t, 2)
        out.update(prompt=prompt, new_tokens=int(new.numel()), answer=tok.decode(new, skip_special_tokens=True))
        if cuda:
            out["peak_gpu_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        del model
        if cuda:
            torch.cuda.empty_cache()
        out["ok"] = out["weights_finite"] and out["new_tokens"] > 0
    except Exception as e:  # noqa: BLE001 - recorded as a failed reload
        out.update(ok=False, error=f"{type(e).__name__}: {str(e)[:800]}")
    return out


class VllmServer:
    """A `vllm serve` subprocess in its own process group (vLLM starts engine workers; stopping the group stops
    them too), ready when GET /v1/models answers."""

    def __init__(self, argv: List[str], workdir: Path, base_url: str, timeout_s: float) -> None:
        self.argv, self.workdir, self.timeout_s = argv, workdir, timeout_s
        self.models_url = base_url.rstrip("/") + "/models"
        self.log_path = workdir / "vllm_server.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        print("vllm server: " + shlex.join(self.argv), flush=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **STAGE_ENV}, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm server exited with {self.proc.returncode}: {self.tail(1200)}")
            try:
                with urllib.request.urlopen(self.models_url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vllm server not ready after {self.timeout_s:.0f} s: {self.tail(1200)}")

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            pgid = os.getpgid(self.proc.pid)
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.tail(1500)


def summarize(result: Dict[str, Any]) -> Dict[str, Any]:
    by = {s["step"]: s for s in result["steps"]}
    out: Dict[str, Any] = {name: by[name].get("status", "not run") for name in STEP_NAMES if name in by}
    tf, vl = by.get("raw_cots_transformers", {}), by.get("raw_cots_vllm", {})
    for name, s in (("raw_cots_transformers", tf), ("raw_cots_vllm", vl)):
        if s.get("tokens_per_s"):
            out[f"{name}_tokens_per_s"] = s["tokens_per_s"]
    if tf.get("tokens_per_s") and vl.get("tokens_per_s"):
        out["vllm_vs_transformers_tokens_per_s"] = round(vl["tokens_per_s"] / tf["tokens_per_s"], 2)
    for name in ("sft_zero2", "sft_zero3"):
        s = by.get(name, {})
        if s.get("status") == "ok":
            out[f"{name}_tokens_per_s"] = s.get("tokens_per_s")
            out[f"{name}_mfu"] = s.get("mfu")
            out[f"{name}_peak_gpu_mem_mib"] = s.get("peak_gpu_mem_mib")
            out[f"{name}_answer"] = (s.get("reload") or {}).get("answer")
    return out


def read_install_report(path: Optional[str]) -> Dict[str, Any]:
    """The tab-separated `name<TAB>status<TAB>detail` lines bench/gpu_check.sh writes about what it installed."""
    out: Dict[str, Any] = {}
    if not path or not Path(path).is_file():
        return out
    for ln in Path(path).read_text(errors="replace").splitlines():
        parts = ln.split("\t", 2)
        if len(parts) >= 2:
            out[parts[0]] = {"status": parts[1], "detail": parts[2] if len(parts) > 2 else ""}
    return out


def vllm_status(install: Dict[str, Any]) -> Dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return {"available": True, "reason": None}
    reason = (install.get("vllm") or {}).get("detail") or "the vllm package is not installed"
    return {"available": False, "reason": reason}


# ------------------------------------------------------------------------------------------------ wheels for offline GPUs
def read_wheel_list(path: Path) -> List[Tuple[str, bool]]:
    """(NAME==VERSION, is_sdist) per line of configs/gpu_check/device_wheels.txt."""
    out = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        spec, _, comment = ln.partition("#")
        if spec.strip():
            out.append((spec.strip(), "sdist" in comment))
    return out


def split_into_parts(files: Sequence[Tuple[str, int]], part_bytes: int) -> List[List[Tuple[str, int, int]]]:
    """Pack (name, size) files into parts of at most `part_bytes`; a larger file is cut into chunks.

    Returns parts of (name, offset, length) pieces. Pure, so the packing rule is tested without downloads.
    """
    pieces: List[Tuple[str, int, int]] = []
    for name, size in sorted(files, key=lambda f: -f[1]):
        off = 0
        while True:
            n = min(part_bytes, size - off)
            pieces.append((name, off, n))
            off += n
            if off >= size:
                break
    parts: List[List[Tuple[str, int, int]]] = []
    room: List[int] = []
    for piece in pieces:  # first fit, biggest first
        for i, r in enumerate(room):
            if piece[2] <= r:
                parts[i].append(piece)
                room[i] -= piece[2]
                break
        else:
            parts.append([piece])
            room.append(part_bytes - piece[2])
    return parts


def chunk_name(name: str, offset: int, size: int, part_bytes: int) -> str:
    return f"{name}.part{offset // part_bytes:02d}of{math.ceil(size / part_bytes):02d}"


CHUNK = re.compile(r"(.+)\.part(\d+)of(\d+)")


def join_wheelhouses(dest: Path, houses: Sequence[Path]) -> List[str]:
    """Copy every file of the wheelhouses into `dest`, joining NAME.partKofN chunks (cut by --pack-wheels, possibly
    carried in different folders) back into NAME. Used by gpu_check.sh before it installs; stdlib only.

    Raises:
        OverlayError: a split file with a chunk missing (installing a truncated wheel would fail obscurely later).
    """
    dest.mkdir(parents=True, exist_ok=True)
    chunks: Dict[Tuple[str, int], Dict[int, Path]] = {}
    copied: List[str] = []
    for house in houses:
        for f in sorted(p for p in Path(house).glob("*") if p.is_file()):
            m = CHUNK.fullmatch(f.name)
            if m:
                chunks.setdefault((m[1], int(m[3])), {})[int(m[2])] = f
            else:
                shutil.copy2(f, dest / f.name)
                copied.append(f.name)
    for (name, total), got in sorted(chunks.items()):
        if sorted(got) != list(range(total)):
            raise OverlayError(f"{name}: have chunk(s) {sorted(got)} of {total}: carry every part first")
        with open(dest / name, "wb") as out:
            for i in range(total):
                out.write(got[i].read_bytes())
        copied.append(name)
    return sorted(set(copied))


def pack_wheels(dest: Path, part_mib: float, python_version: str, root: Path = ROOT) -> int:
    """Download the distributions of device_wheels.txt for CPython `python_version` on manylinux x86-64 into
    dest/all, then lay them out as dest/part1, dest/part2, ... of at most `part_mib` each (a file bigger than a part
    is cut into NAME.partNN chunks, which bench/gpu_check.sh joins again)."""
    wanted = read_wheel_list(root / WHEELS_FILE)
    all_dir = dest / "all"
    all_dir.mkdir(parents=True, exist_ok=True)
    plats = ["manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(all_dir)]
    wheels = [s for s, sdist in wanted if not sdist]
    sdists = [s for s, sdist in wanted if sdist]
    cmd = pip + ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in plats:
        cmd += ["--platform", p]
    print(shlex.join(cmd + ["..."]), flush=True)
    rc = subprocess.call(cmd + wheels)
    if sdists:
        rc = rc or subprocess.call(pip + ["--no-binary=:all:"] + sdists)
    if rc != 0:
        print(f"pip download failed ({rc})", file=sys.stderr)
        return rc
    files = [(p.name, p.stat().st_size) for p in sorted(all_dir.iterdir()) if p.is_file()]
    part_bytes = int(part_mib * 2**20)
    parts = split_into_parts(files, part_bytes)
    sizes = dict(files)
    for i, part in enumerate(parts, 1):
        pdir = dest / f"part{i}"
        shutil.rmtree(pdir, ignore_errors=True)
        pdir.mkdir()
        for name, off, n in part:
            if n == sizes[name]:
                shutil.copy2(all_dir / name, pdir / name)
            else:  # NAME.partKofN: join_wheelhouses (gpu_check.sh) joins chunks 0..N-1, refusing an incomplete set
                with open(all_dir / name, "rb") as src, open(pdir / chunk_name(name, off, sizes[name], part_bytes),
                                                             "wb") as dst:
                    src.seek(off)
                    dst.write(src.read(n))
        total = sum(n for _, _, n in part)
        print(f"{pdir}: {len(part)} files, {total / 2**20:.1f} MiB")
    print(f"\n{len(files)} distributions, {sum(s for _, s in files) / 2**20:.1f} MiB in {len(parts)} parts. "
          f"On the GPU machine, carry one part per call into the same folder (e.g. /tmp/gpu_check_wheels), then:\n"
          f"  bash bench/gpu_check.sh --wheelhouse /tmp/gpu_check_wheels")
    return 0


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/gpu_check.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Params overlays live in configs/gpu_check/ (base.yaml for every step, one file per step, "
               "cpu_smoke.yaml for --cpu-smoke). Each is validated with the project's schema (pipelines.params) "
               "before anything runs; a bad key is a one-line error naming the file and the key, exit code 2.")
    p.add_argument("--dry-run", action="store_true",
                   help="Validate every overlay and print the commands each step would run; exits 0 without a GPU.")
    p.add_argument("--json", action="store_true", help="With --dry-run: print the plan as JSON.")
    p.add_argument("--steps", default=",".join(STEP_NAMES),
                   help=f"Comma-separated steps to run, in the fixed order (default: all: {','.join(STEP_NAMES)}). "
                        "prep is always run first when a later step needs the work copy's data.")
    p.add_argument("--category", default="violence", help="The category of the data spine and of raw_cots (default: "
                                                          "violence, whose 14 prompts cover all three labels).")
    p.add_argument("--extra-overlay", action="append", default=[], metavar="YAML",
                   help="A params overlay applied after the step's own, to every step (e.g. more SFT steps). Repeatable.")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"Result JSON (default: {DEFAULT_OUT}).")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR),
                   help=f"Work copy of the project (default: {DEFAULT_WORKDIR}). Reused when it exists, so a rerun "
                        "skips what DVC already has; --fresh starts over.")
    p.add_argument("--fresh", action="store_true", help="Delete the work copy first.")
    p.add_argument("--budget-s", type=float, default=None,
                   help="Skip a step when the time used plus its estimate would pass this (default 420 s on a GPU, "
                        "none with --cpu-smoke; the install in gpu_check.sh comes on top, for <= 8 min of GPU time "
                        "in all). prep always runs.")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="Rehearse on a machine without a GPU: launcher python, fp32, 2 SFT steps, no vLLM. Checks the "
                        "harness (copy, DVC, Dagster, metrics, reload), not the GPU path.")
    p.add_argument("--no-vllm", action="store_true", help="Skip the vLLM steps.")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                   help="vllm serve --gpu-memory-utilization (default 0.3: a 135M model needs little KV cache).")
    p.add_argument("--vllm-start-timeout-s", type=float, default=300.0, help="Wait for the vLLM server (default 300).")
    p.add_argument("--answer-tokens", type=int, default=64, help="Tokens of the answer asked of each checkpoint.")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="Peak dense bf16 FLOP/s of one GPU, for a GPU missing from the built-in table.")
    p.add_argument("--install-report", default=None, help=argparse.SUPPRESS)  # written by gpu_check.sh
    p.add_argument("--mirror-dir", default=None,
                   help="Also write the result JSON into this folder after every step (gpu_check.sh --copy-to).")
    p.add_argument("--pack-wheels", metavar="DIR", default=None,
                   help="Instead of the check: download configs/gpu_check/device_wheels.txt for an offline GPU "
                        "machine into DIR/all and split them into DIR/part1.. (run where PyPI is reachable).")
    p.add_argument("--join-wheels", nargs="+", metavar="DIR", default=None,
                   help=argparse.SUPPRESS)  # gpu_check.sh: DEST HOUSE...: join split wheels before installing
    p.add_argument("--part-mib", type=float, default=56.0, help="Largest part for --pack-wheels (default 56 MiB).")
    p.add_argument("--python-version", default="3.12", help="Target CPython for --pack-wheels (default 3.12).")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_NAMES]
    if unknown:
        p.error(f"--steps: unknown step(s) {', '.join(unknown)} (choose from {', '.join(STEP_NAMES)})")
    if any(s != "prep" for s in steps) and "prep" not in steps:
        steps.insert(0, "prep")  # the stages under test read the work copy's base model and SFT rows
    args.steps = steps
    if args.budget_s is None:  # a rehearsal on CPU is slow by nature: skipping steps there would defeat it
        args.budget_s = math.inf if args.cpu_smoke else 420.0
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.pack_wheels:
        return pack_wheels(Path(args.pack_wheels), args.part_mib, args.python_version)
    if args.join_wheels:
        if len(args.join_wheels) < 2:
            print("error: --join-wheels DEST HOUSE [HOUSE...]", file=sys.stderr)
            return 2
        try:
            names = join_wheelhouses(Path(args.join_wheels[0]), [Path(h) for h in args.join_wheels[1:]])
        except OverlayError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{len(names)} files in {args.join_wheels[0]}")
        return 0
    try:
        steps = plan(args)
    except OverlayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if args.json:
            print(json.dumps([{"step": ps.step.name, "overlays": ps.overlay_files, "skip": ps.skip,
                               "changes": ps.changes, "commands": ps.commands} for ps in steps], indent=2))
        else:
            print_plan(steps, args)
        return 0

    install = read_install_report(args.install_report)
    result: Dict[str, Any] = {
        "schema": 1, "issue": 22, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "argv": sys.argv[1:] if argv is None else list(argv),
        "python": sys.version.split()[0], "packages": package_versions(), "install": install,
        "gpu": gpu_info(args.peak_flops), "steps": [],
    }
    result["vllm"] = vllm_status(install)
    if not args.cpu_smoke and not result["gpu"]["cuda"]:
        result["fatal"] = "torch sees no CUDA device (use --dry-run or --cpu-smoke on a machine without a GPU)"
        write_json_atomic(Path(args.out), result)
        print(f"error: {result['fatal']}", file=sys.stderr)
        return 2
    print_plan(steps, args)
    result["workdir"] = prepare_workdir(ROOT, Path(args.workdir), args.fresh)
    runner = Runner(args, steps, result)
    try:
        return runner.run()
    except KeyboardInterrupt:
        result["fatal"] = "interrupted"
        runner.save()
        return 130


if __name__ == "__main__":
    sys.exit(main())
