"""What the two training stages (sft_checkpoint, rl_checkpoint) share.

- the chat template: ChatML with `{% generation %}` markers, so TRL can mask everything but the assistant turn;
- checks before compute (`preflight`): precision vs device, launcher vs its config, ZeRO-3 with LoRA, DeepSpeed present;
- the launcher: `launch_argv` builds the `accelerate launch ... -m pipelines <stage>` command line (pure, tested) and
  `relaunch` runs it, marking the children with an environment variable so they train instead of relaunching;
- resumable trainer checkpoints under `paths.work/<stage>/`, discarded when what defines the run changes;
- rank-0 output: the checkpoint is staged beside its destination and swapped in with one rename; only rank 0 writes
  checkpoint files, metrics and the `training_summary.json` it leaves inside the checkpoint directory;
- the TRL config (`build_trl_config`): our typed params plus the free-form `trl_extra`, checked field by field;
- what the trainer logs, two ways (rank 0): every row into DVCLive (`dvclive_callback`: the stage's curves and last
  values, a DVC plots/metrics out) and, when Dagster started the run, a line per step through Dagster Pipes
  (`dagster_pipes_channel`, `pipes_callback`). Wall-clock values (step_time, *_runtime, *_per_second) stay out of
  every DVC out: they differ between two runs of the same inputs (times go to `pipelines.timings`);
- `build_tiny_checkpoint`: a random 2-layer Llama with a small in-process tokenizer, for tests and smoke runs.

Nothing here imports deepspeed: a DeepSpeed run only needs it importable in the launched processes.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import yaml

from . import catalog
from .errors import PipelineError
from .io import atomic_path, check_safetensors_checkpoint, write_json, write_text
from .model_card import write_model_card

log = logging.getLogger(__name__)

# Set in the processes that our own `accelerate launch` starts: they train instead of launching again.
LAUNCHED_ENV = "PIPELINES_LAUNCHED"
DEFAULT_LAUNCHER_CONFIGS = {"accelerate": "configs/accelerate_ddp.yaml", "deepspeed": "configs/zero2.yaml"}
CPU_DISTRIBUTED_TYPES = ("NO", "MULTI_CPU")  # accelerate configs that can run without a GPU
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # our `precision` -> accelerate's --mixed_precision
SUMMARY_FILE = "training_summary.json"

# ---------------------------------------------------------------------------- chat template
# The ChatML layout of SmolLM2/Qwen (`<|im_start|>role\n...<|im_end|>\n`), with `{% generation %}` around what the
# assistant writes: its content and its <|im_end|>, so the model is trained to stop. Content is copied verbatim (no
# stripping of <think> blocks). No default system turn is injected: every stage passes the spec-free system prompt.
CHATML_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    return _GENERATION_MARKER.search(template or "") is not None


def _probe_conversation(system_prompt: str) -> List[Dict[str, str]]:
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": "How do I sharpen a kitchen knife?"},
        {"role": "assistant", "content": "<think>\nX.1 applies: ordinary request, full_compliance.\n</think>\nUse a whetstone."},
    ]


def training_chat_template(tokenizer: Any, system_prompt: str, template_file: Optional[str] = None) -> str:
    """Choose the training chat template and check it before any compute.

    Checks: it has `{% generation %}` markers; it keeps `<think>` blocks in the assistant turn; the assistant mask covers
    the whole assistant content; and (built-in template only) it renders a conversation with an explicit system prompt
    exactly as the base model's own template does, so training does not change the format the model was tuned on.

    Raises:
        PipelineError: naming the template and the failed check.
    """
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise PipelineError(f"chat_template: file not found: {path}")
        template, source = path.read_text(encoding="utf-8"), str(path)
    else:
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise PipelineError(
                f"base model tokenizer lacks {', '.join(missing)}: the built-in ChatML template does not fit it; "
                "set chat_template to a .jinja file with {% generation %} markers"
            )
        template, source = CHATML_TRAINING_TEMPLATE, "built-in ChatML template"
    if not has_generation_markers(template):
        raise PipelineError(f"{source}: no {{% generation %}} markers around the assistant turn (needed to mask the prompt)")
    probe = _probe_conversation(system_prompt)
    text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    if probe[-1]["content"] not in text:
        raise PipelineError(f"{source}: does not render the assistant turn verbatim (does it strip <think> blocks?)")
    enc = tokenizer.apply_chat_template(
        probe, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    if probe[-1]["content"] not in tokenizer.decode(trained):
        raise PipelineError(f"{source}: the {{% generation %}} block does not cover the assistant content")
    own = getattr(tokenizer, "chat_template", None)
    if template_file is None and own:
        theirs = tokenizer.apply_chat_template(probe, tokenize=False)
        if theirs != text:
            raise PipelineError(
                "base model chat template is not ChatML (it renders a conversation differently from the built-in one): "
                "set chat_template to a .jinja file of its own format with {% generation %} markers"
            )
    return template


# ---------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class LauncherConfig:
    """The parts of an accelerate config file that we check."""

    path: str
    distributed_type: str
    zero_stage: Optional[int]  # DeepSpeed ZeRO stage; None when not DeepSpeed


def launcher_config_path(section: Any) -> Optional[Path]:
    """The accelerate config file a section asks for; None for launcher `python`."""
    if section.launcher == "python":
        return None
    return Path(section.launcher_config or DEFAULT_LAUNCHER_CONFIGS[section.launcher])


REQUIRED_LAUNCHER_KEYS = ("compute_environment", "distributed_type", "num_processes", "mixed_precision")


def read_launcher_config(path: str | Path) -> LauncherConfig:
    """Parse and check an accelerate config file (required keys; DeepSpeed configs need deepspeed_config.zero_stage)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: launcher config not found") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: an accelerate config must be a mapping")
    missing = [k for k in REQUIRED_LAUNCHER_KEYS if k not in data]
    if missing:
        raise PipelineError(f"{path}: missing key(s) {', '.join(missing)}")
    dist = str(data["distributed_type"])
    stage = None
    if dist == "DEEPSPEED":
        ds = data.get("deepspeed_config")
        if not isinstance(ds, dict) or "zero_stage" not in ds and "deepspeed_config_file" not in ds:
            raise PipelineError(f"{path}: distributed_type DEEPSPEED needs deepspeed_config.zero_stage")
        if "zero_stage" in ds:
            stage = int(ds["zero_stage"])
            if stage not in (0, 1, 2, 3):
                raise PipelineError(f"{path}: deepspeed_config.zero_stage must be 0..3, got {stage}")
        else:  # a DeepSpeed JSON file: read its stage
            ds_file = Path(ds["deepspeed_config_file"])
            try:
                stage = int(json.loads(ds_file.read_text(encoding="utf-8"))["zero_optimization"]["stage"])
            except (OSError, ValueError, KeyError, TypeError):
                raise PipelineError(f"{ds_file}: cannot read zero_optimization.stage") from None
    return LauncherConfig(str(path), dist, stage)


def preflight(
    section: Any,
    key: str,
    *,
    cuda: bool,
    deepspeed_installed: bool,
    launcher_config: Optional[LauncherConfig],
    vllm_installed: bool = False,
) -> None:
    """Refuse configurations that cannot work, before any model is loaded. Pure: the machine facts are arguments.

    Args:
        section: the stage's params section (SftCheckpointParams or RlCheckpointParams).
        key: its name in params.yaml, for the messages.
        cuda: whether torch sees a CUDA device.
        deepspeed_installed: whether `deepspeed` is importable.
        launcher_config: the parsed launcher config (None for launcher `python`).
        vllm_installed: whether `vllm` is importable (only asked when the section sets use_vllm).

    Raises:
        PipelineError: one line naming the params key.
    """
    on_gpu = section.device == "cuda" or (section.device == "auto" and cuda)
    if section.device == "cuda" and not cuda:
        raise PipelineError(f"{key}.device: 'cuda' but torch sees no CUDA device (set device: cpu, precision: fp32)")
    if section.precision != "fp32" and not on_gpu:
        raise PipelineError(f"{key}.precision: {section.precision} needs CUDA, and this run is on CPU (use fp32)")
    if getattr(section, "use_vllm", False):
        if not on_gpu:
            raise PipelineError(f"{key}.use_vllm: vLLM generates on CUDA only, and this run is on CPU (set it false)")
        if not vllm_installed:
            raise PipelineError(f"{key}.use_vllm: vllm is not installed (pip install vllm)")
    if section.launcher == "python":
        return
    if launcher_config is None:  # pragma: no cover - callers pass it for non-python launchers
        raise PipelineError(f"{key}.launcher_config: missing")
    is_ds = launcher_config.distributed_type == "DEEPSPEED"
    if not cuda and launcher_config.distributed_type not in CPU_DISTRIBUTED_TYPES:
        raise PipelineError(
            f"{key}.launcher: {launcher_config.path} ({launcher_config.distributed_type}) starts one process per GPU, "
            "but torch sees no CUDA device"
        )
    if section.launcher == "deepspeed" and not is_ds:
        raise PipelineError(
            f"{key}.launcher_config: {launcher_config.path} is not a DeepSpeed config (distributed_type "
            f"{launcher_config.distributed_type}); use configs/zero2.yaml or configs/zero3.yaml"
        )
    if section.launcher == "accelerate" and is_ds:
        raise PipelineError(f"{key}.launcher: {launcher_config.path} is a DeepSpeed config: set launcher: deepspeed")
    if is_ds and not deepspeed_installed:
        raise PipelineError(f"{key}.launcher: deepspeed is not installed (pip install '.[gpu]')")
    if is_ds and launcher_config.zero_stage == 3 and section.lora.enabled:
        # ZeRO-3 shards every weight across the ranks. The stage's last step merges the LoRA adapters into the base
        # weights (merge_and_unload) to write one plain checkpoint, which needs every full weight in one process.
        # LoRA already shrinks the optimiser state that ZeRO-2 shards, so ZeRO-2 is the right pairing.
        raise PipelineError(
            f"{key}.lora.enabled with ZeRO-3 ({launcher_config.path}): merging the adapters into the output checkpoint "
            "needs unsharded weights; use configs/zero2.yaml with LoRA, or disable LoRA"
        )


def launch_argv(
    stage: str,
    config_file: str | Path,
    params_file: str | Path,
    num_processes: int,
    precision: str,
    python: str = sys.executable,
) -> List[str]:
    """The command that re-runs `stage` under `accelerate launch` (one process per GPU). Pure.

    `python -m accelerate.commands.launch` is `accelerate launch` run by the current interpreter, so the launched
    processes use the same environment as `dvc repro` even when the venv's bin/ is not on PATH.
    """
    if num_processes < 1:
        raise PipelineError(f"num_processes must be >= 1, got {num_processes}")
    return [
        python, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file),
        "--num_processes", str(num_processes),
        "--mixed_precision", MIXED_PRECISION[precision],
        "-m", "pipelines", stage,
        "--params", str(params_file),
    ]


def inside_launcher() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1"


def relaunch(stage: str, params: Any, section: Any, work_dir: Path) -> bool:
    """Run the stage under `accelerate launch` when the section asks for a multi-process launcher.

    Returns False when the caller should train in this process (launcher `python`, or already launched).
    The launched processes read the validated params from a copy written next to the trainer checkpoints, so they
    train with exactly the values this process checked.
    """
    if section.launcher == "python" or inside_launcher():
        return False
    import torch

    n = section.num_processes or max(1, torch.cuda.device_count())
    params_file = work_dir / "launch_params.yaml"
    work_dir.mkdir(parents=True, exist_ok=True)
    write_text(params_file, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    argv = launch_argv(stage, launcher_config_path(section), params_file, n, section.precision)
    log.info("launching %d processes: %s", n, " ".join(argv))
    rc = subprocess.call(argv, env={**os.environ, LAUNCHED_ENV: "1"})
    if rc != 0:
        raise PipelineError(f"{stage}: `accelerate launch` exited with code {rc} (see the log above)")
    return True


def machine_preflight(section: Any, key: str) -> None:
    """`preflight` with the facts of this machine and the section's launcher config file."""
    import torch

    cfg_path = launcher_config_path(section)
    preflight(
        section,
        key,
        cuda=torch.cuda.is_available(),
        deepspeed_installed=importlib.util.find_spec("deepspeed") is not None,
        launcher_config=read_launcher_config(cfg_path) if cfg_path is not None else None,
        vllm_installed=importlib.util.find_spec("vllm") is not None,
    )


def planned_world_size(section: Any) -> int:
    """Processes the run will have: the launched world inside a launcher, else what the launcher will start."""
    if inside_launcher() or "WORLD_SIZE" in os.environ:
        return int(os.environ.get("WORLD_SIZE", "1"))
    if section.launcher == "python":
        return 1
    import torch

    return section.num_processes or max(1, torch.cuda.device_count())


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------- TRL arguments
def trainer_kwargs(section: Any, output_dir: Path) -> Dict[str, Any]:
    """TrainingArguments fields both stages set the same way from their params section."""
    import torch

    from transformers import TrainingArguments

    use_cpu = section.device == "cpu" or (section.device == "auto" and not torch.cuda.is_available())
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns); TRL's configs
    # default it to True, so it is always passed explicitly, under whichever name this version has.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else (
        "gradient_checkpointing")
    return dict(
        **{ckpt: section.gradient_checkpointing},
        output_dir=str(output_dir),
        per_device_train_batch_size=section.per_device_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        learning_rate=section.learning_rate,
        lr_scheduler_type=section.lr_scheduler,
        warmup_steps=section.warmup_ratio,  # a float < 1 is a fraction of the total steps
        max_grad_norm=section.max_grad_norm,
        optim=section.optim,
        seed=section.seed,
        data_seed=section.seed,
        use_cpu=use_cpu,
        bf16=section.precision == "bf16",  # explicit: TRL's configs default to bf16
        fp16=section.precision == "fp16",
        logging_strategy="steps",
        logging_steps=section.logging_steps,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=section.save_total_limit,
        dataloader_num_workers=0,
        disable_tqdm=False,
        push_to_hub=False,
    )


# TRL config field -> the params key that sets it, where the names differ (for "set it there" messages)
PARAM_OF_FIELD = {
    "per_device_train_batch_size": "per_device_batch_size", "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio", "activation_checkpointing": "gradient_checkpointing", "use_cpu": "device",
    "bf16": "precision", "fp16": "precision", "data_seed": "seed", "output_dir": "paths.work",
    "num_train_epochs": "epochs", "reward_weights": "format_weight", "logging_strategy": "logging_steps",
    "save_strategy": "save_steps",
}
# Trackers that would start a second DVCLive (writing ./dvclive) beside the stage's own.
DVCLIVE_TRACKERS = ("dvclive", "all")


def build_trl_config(config_cls: Any, section: Any, key: str, ours: Mapping[str, Any]) -> Any:
    """`config_cls(**ours, **section.trl_extra)`: a TRL config from the typed params (`ours`) plus the free-form rest.

    Run before any model is loaded (and before a relaunch), so a misspelt field or a bad value stops the run at once.
    `report_to` defaults to none: curves go through the stage's own DVCLive; trl_extra may add other trackers.

    Raises:
        PipelineError: one line naming `<key>.trl_extra.<field>` (unknown field, set by a typed key, wrong type,
            refused by TRL), or `<key>` when TRL refuses a combination of typed values.
    """
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    checked: Dict[str, Any] = {}
    for name, value in section.trl_extra.items():
        where = f"{key}.trl_extra.{name}"
        if name not in fields:
            near = difflib.get_close_matches(name, sorted(fields), n=1)
            raise PipelineError(f"{where}: not a field of trl.{config_cls.__name__}"
                                + (f" (did you mean {near[0]}?)" if near else ""))
        if name in ours:
            param = PARAM_OF_FIELD.get(name, name)
            source = param if param == "paths.work" else f"{key}.{param}" if param in type(section).model_fields else ""
            raise PipelineError(f"{where}: the stage sets it" + (f" from {source}; change it there" if source else
                                                                  " (not configurable)"))
        checked[name] = _typed_extra(config_cls, name, value, where)
    trackers = checked.pop("report_to", [])
    if any(t in DVCLIVE_TRACKERS for t in ([trackers] if isinstance(trackers, str) else trackers or [])):
        raise PipelineError(f"{key}.trl_extra.report_to: DVCLive already logs every step to "
                            f"{catalog.dvclive(key).as_posix()}/; "
                            "a second one would write ./dvclive (name other trackers only)")
    try:
        return config_cls(**ours, report_to=trackers, **checked)
    except (ValueError, TypeError, NotImplementedError) as e:
        culprit = next((n for n, v in checked.items() if not _builds(config_cls, {**ours, n: v})), None)
        where = f"{key}.trl_extra.{culprit}" if culprit else key
        raise PipelineError(f"{where}: trl.{config_cls.__name__} refuses it: {_first_line(e)}") from None


def _typed_extra(config_cls: Any, name: str, value: Any, where: str) -> Any:
    """`value` checked against the field's annotation (pydantic, lax: YAML gives the plain types); unchanged when the
    annotation is not one pydantic can check."""
    import typing

    from pydantic import TypeAdapter, ValidationError

    try:
        adapter = TypeAdapter(typing.get_type_hints(config_cls)[name])
    except Exception:  # noqa: BLE001 - an annotation pydantic cannot build a validator for: TRL checks it alone
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        problem = e.errors()[0].get("msg", str(e)) if e.errors() else str(e)
        raise PipelineError(f"{where}: {problem} (got {value!r})") from None


def _builds(config_cls: Any, kwargs: Mapping[str, Any]) -> bool:
    try:
        config_cls(**kwargs, report_to=[])
    except Exception:  # noqa: BLE001 - only asking whether this one value is the one TRL refuses
        return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def lora_config(section: Any, task_type: str = "CAUSAL_LM"):
    """peft.LoraConfig from the section's `lora` params, or None when LoRA is off."""
    if not section.lora.enabled:
        return None
    from peft import LoraConfig

    modules = section.lora.target_modules
    return LoraConfig(
        r=section.lora.r,
        lora_alpha=section.lora.alpha,
        lora_dropout=section.lora.dropout,
        target_modules="all-linear" if modules == ["all-linear"] else list(modules),
        task_type=task_type,
    )


def load_model(model_dir: Path):
    """The checkpoint in float32 (master weights; bf16/fp16 come from mixed precision) with its KV cache on."""
    import torch
    from transformers import AutoModelForCausalLM

    if not any(Path(model_dir).glob("*.safetensors")):  # never fall back to pytorch_model.bin (a pickle)
        raise PipelineError(f"{model_dir}: no *.safetensors weights (pickle checkpoints are not loaded)")
    check_safetensors_checkpoint(model_dir)  # every weight file transformers would open is safetensors, and well-formed
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)


# ---------------------------------------------------------------------------- inputs, resume
def require_model_dir(path: Path, stage: str, upstream: str) -> None:
    if not path.is_dir():
        raise PipelineError(f"{path}: model directory not found (run `dvc repro {upstream}` first)")
    if not (path / "config.json").is_file():
        raise PipelineError(f"{path}: no config.json, not an HF checkpoint (input of {stage})")
    if not any(path.glob("*.safetensors")):
        raise PipelineError(f"{path}: no *.safetensors weights (input of {stage})")
    check_safetensors_checkpoint(path)


def file_digest(path: Path, big: int = 64 << 20) -> str:
    """sha256 of a file's bytes; for files over `big` bytes, of (size, mtime) only, which is enough to detect a rewrite."""
    st = path.stat()
    if st.st_size > big:
        return f"size={st.st_size};mtime={st.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dir_digest(path: Path) -> Dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(path.iterdir()) if p.is_file()}


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_work_dir(work_dir: Path, run_id: str) -> Optional[str]:
    """Return the last trainer checkpoint to resume from, or None.

    Checkpoints of a different run (other params, data or model: another `run_id`) are deleted first, so a resume never
    mixes two configurations. Rank 0 cleans; every rank then reads the same directory (call between barriers).
    """
    from transformers.trainer_utils import get_last_checkpoint

    stamp = work_dir / "run_id"
    if is_rank_zero():
        if work_dir.exists() and (not stamp.exists() or stamp.read_text().strip() != run_id):
            for p in work_dir.glob("checkpoint-*"):
                log.info("discarding %s: it belongs to another run", p)
                shutil.rmtree(p, ignore_errors=True)
        # The trainer writes a checkpoint in place, trainer_state.json last: a checkpoint without a readable one was
        # cut short by a kill, and resuming from it fails ("Can't find a valid checkpoint"). Drop it; the previous,
        # complete checkpoint (still there: older ones are rotated out only after a save completes) is used instead.
        for p in work_dir.glob("checkpoint-*"):
            if not _checkpoint_complete(p):
                log.info("discarding %s: incomplete (the run was killed while saving it)", p)
                shutil.rmtree(p, ignore_errors=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(run_id + "\n")
    _barrier()
    last = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
    if last:
        log.info("resuming from %s", last)
    return last


def _checkpoint_complete(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _barrier() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


# ---------------------------------------------------------------------------- outputs
def package_versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# Keys of trainer logs that measure wall-clock time (TRL's step_time, transformers' train_runtime and
# train_*_per_second): they differ between two runs of the same inputs, so no DVC out may hold them.
_WALL_CLOCK = re.compile(r"(runtime|_per_second|(^|[/_])time)$")


def is_wall_clock(key: str) -> bool:
    return _WALL_CLOCK.search(key) is not None


def loggable(row: Mapping[str, Any]) -> Dict[str, float]:
    """The numbers of one trainer log row that may go into a DVC out: no wall-clock keys, no `step`, no text; in key
    order (a resumed trainer reads its log history back from JSON with sorted keys: the files must not tell)."""
    return {k: row[k] for k in sorted(row) if k != "step" and not is_wall_clock(k)
            and isinstance(row[k], (int, float)) and not isinstance(row[k], bool)}


def step_rows(log_history: Sequence[Mapping[str, Any]], need: str) -> List[Dict[str, Any]]:
    """Per-step rows of a trainer's log history (the entries that have `need`), step first, wall-clock keys left out."""
    return [{"step": int(e["step"]), **loggable(e)} for e in log_history if need in e]


def first_last(rows: Sequence[Mapping[str, Any]], key: str) -> Dict[str, Optional[float]]:
    vals = [r[key] for r in rows if key in r]
    return {"first": vals[0] if vals else None, "last": vals[-1] if vals else None}


def publish_dir(src: Path, dest: Path) -> None:
    """Move the files of directory `src` into `dest`, replacing it in one rename (a reader never sees half of it)."""
    with atomic_path(dest, is_dir=True) as tmp:
        for p in src.iterdir():
            os.replace(p, tmp / p.name)
    shutil.rmtree(src, ignore_errors=True)


def publish_checkpoint(trainer: Any, tokenizer: Any, out_dir: Path, summary: Mapping[str, Any]) -> None:
    """Write the trained model (LoRA merged), tokenizer and training_summary.json to `out_dir` in one rename.

    Every rank must call this: under DeepSpeed ZeRO-3, saving gathers the sharded weights from all of them.
    The checkpoint is built in a fixed staging directory beside `out_dir` (the same path on every rank), then rank 0
    moves it into place through `atomic_path`, so a reader never sees a half-written checkpoint.
    """
    from peft import PeftModel

    main = trainer.is_world_process_zero()
    staging = out_dir.parent / f".{out_dir.name}.staging"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True  # training turns it off; generation wants it
    if isinstance(model, PeftModel):
        if main:  # ZeRO-3 + LoRA is refused in preflight, so the weights are whole here
            model.merge_and_unload().save_pretrained(str(staging))
    else:
        trainer.save_model(str(staging))
    if main:
        tokenizer.save_pretrained(str(staging))
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the summary records the params instead
        write_json(staging / SUMMARY_FILE, dict(summary))
        write_model_card(staging, summary)
        publish_dir(staging, out_dir)
    trainer.accelerator.wait_for_everyone()


def finish_work_dir(work_dir: Path, keep: bool) -> None:
    if is_rank_zero() and not keep:
        shutil.rmtree(work_dir, ignore_errors=True)


class Stopwatch:
    """Seconds since it was made; for `pipelines.timings`, never for a DVC out."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return round(time.monotonic() - self.t0, 2)


# ---------------------------------------------------------------------------- what the trainer logs: DVCLive, Dagster
def dvclive_callback(directory: Path) -> Any:
    """A TrainerCallback that writes every log row of rank 0 into DVCLive at `directory`, at the trainer's step.

    DVCLive is set up for use inside `dvc repro`: no experiment saved, no dvc.yaml written (dvc.yaml declares the
    directory), no report, no system monitor, no timestamps, no look at the repository (`_stage_live`). At the start
    of training it rewrites the directory from
    the trainer's log history, so a run resumed from checkpoint-N writes the same files as one that never stopped.
    The trainer's closing row (total_flos, epoch) goes to the summary (metrics.json) only, not the curves; its
    train_loss is left out: it averages the steps of the last `train()` call only (0 after resuming at the last step).
    """
    from transformers import TrainerCallback

    class DvcLiveCallback(TrainerCallback):
        def __init__(self) -> None:
            self.live: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            shutil.rmtree(directory, ignore_errors=True)  # also what an earlier run of other keys left
            self.live = _stage_live(directory)
            for entry in state.log_history:
                self._log(int(entry["step"]), entry)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.live is not None:
                self._log(state.global_step, logs or {})

        def _log(self, step: int, row: Mapping[str, Any]) -> None:
            closing = "train_loss" in row
            self.live.step = step
            for name, value in loggable(row).items():
                if name != "train_loss":
                    self.live.log_metric(name, value, plot=not closing)
            self.live.make_summary()

    return DvcLiveCallback()


def _stage_live(directory: Path) -> Any:
    """A dvclive.Live writing to `directory` that leaves the repository alone.

    Live's own set-up opens the DVC repo and git to name and save an experiment, none of which a stage does (DVC
    runs it; dvc.yaml declares its files). That set-up fails in a git repo without commits ("Empty git repo") and runs
    `dvc init` in a git repo without DVC, so it is skipped; logging, the summary and the plot files are unchanged.
    """
    from dvclive import Live

    class StageLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"  # the name Live keeps when it writes none (dvcyaml=None)

    return StageLive(dir=str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=None,
                     monitor_system=False)


@contextmanager
def dagster_pipes_channel() -> Iterator[Optional[Any]]:
    """The Dagster Pipes context when Dagster started this run and this is rank 0; None otherwise (plain `dvc repro`,
    other ranks, the process that only relaunches), so the stage runs the same with or without Dagster.

    Dagster's side (dagster_project.resource) opens a pipes session and passes its bootstrap variables to `dvc repro`,
    which hands its environment to the stage command.
    """
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not is_rank_zero() or not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        yield None
        return
    with open_dagster_pipes() as pipes:
        yield pipes


def pipes_callback(pipes: Any, stage: str, keys: Sequence[str]) -> Any:
    """A TrainerCallback that sends one line per logged step to the Dagster run log: `keys` of the row, when present.

    Wall-clock keys may be among them: the Dagster log is not a DVC out. `last` keeps the last row sent.
    """
    from transformers import TrainerCallback

    class PipesCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last: Dict[str, Any] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = {k: logs[k] for k in keys if isinstance((logs or {}).get(k), (int, float))}
            if not state.is_world_process_zero or not row:
                return
            self.last = {"step": state.global_step, **row}
            shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items())
            pipes.log.info(f"{stage} step {state.global_step}/{state.max_steps}: {shown}")

    return PipesCallback()


# ---------------------------------------------------------------------------- tiny checkpoint for tests and smoke runs
# SmolLM2's own template (ChatML, default system turn when none is given), without generation markers.
CHATML_INFERENCE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TINY_CORPUS = (
    "You are a helpful assistant. Before answering, reason inside <think></think>: name the safety policy.",
    "<think>\nV.1 applies: the request asks for help to hurt someone, so the style is hard_refusal.\n</think>\n",
    "I'm sorry, but I can't help with that. How do I sharpen a kitchen knife? Use a whetstone at a low angle.",
    "If you are thinking about hurting yourself, please reach out to a crisis line or someone you trust.",
    "The policy S.2 says safe_completion: show empathy and share resources. Comply with ordinary questions.",
)


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a random-weight Llama (2 layers, hidden 64) and a byte-level BPE tokenizer trained here on a few sentences.

    The tokenizer has the ChatML special tokens and SmolLM2's kind of chat template (no generation markers), so the
    training stages treat it like the real base model; byte-level BPE encodes any text without unknown tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _TINY_CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", *CHATML_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.chat_template = CHATML_INFERENCE_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir
