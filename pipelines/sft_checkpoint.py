"""sft_checkpoint: supervised fine-tuning of the base model on the spec-free chat examples (TRL SFTTrainer).

    python -m pipelines sft_checkpoint                       # what `dvc repro sft_checkpoint` runs
    # on GPUs: params.yaml sft_checkpoint: {device: cuda, precision: bf16, launcher: deepspeed,
    #                                       launcher_config: configs/zero2.yaml}; the same command then re-runs
    #          itself as `accelerate launch --config_file configs/zero2.yaml -m pipelines sft_checkpoint`

Reads  data/base_model/ (HF checkpoint + tokenizer) and data/sft_dataset/train.jsonl (rows with `messages`:
       spec-free system prompt, user prompt, assistant "<think>\\nCoT\\n</think>\\nanswer").
Writes data/sft_checkpoint/ (model.safetensors, config, tokenizer with the training chat template, training_summary.json),
       data/metrics/sft_checkpoint.json (headline figures) and data/dvclive/sft_checkpoint/ (DVCLive: every key the
       trainer logs per step, plots/metrics/<key>.tsv, and their last values, metrics.json). No wall-clock time goes
       into any of them (two runs of the same inputs write the same bytes): times go to paths.work/timings/.
When Dagster runs the stage, rank 0 also sends one line per step (loss, learning rate, ...) to the Dagster run log.
The loss covers the assistant turn only (CoT + answer + end-of-turn), never the system or user text: the chat template
marks the assistant turn with {% generation %} and TRL's `assistant_only_loss` masks the rest to -100.
Trainer checkpoints go to paths.work/sft_checkpoint/; a killed run resumes from the last one.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import catalog, timings
from .cot import split_cot
from .errors import PipelineError
from .io import iter_jsonl, write_json
from .params import Params
from .params.training import SftCheckpointParams
from .training_common import (
    Stopwatch,
    build_trl_config,
    dagster_pipes_channel,
    dir_digest,
    dvclive_callback,
    file_digest,
    finish_work_dir,
    fingerprint,
    is_rank_zero,
    load_model,
    lora_config,
    machine_preflight,
    package_versions,
    pipes_callback,
    planned_world_size,
    prepare_work_dir,
    publish_checkpoint,
    publish_dir,
    relaunch,
    require_model_dir,
    step_rows,
    trainer_kwargs,
    training_chat_template,
)

STAGE = "sft_checkpoint"
# what each step's line in the Dagster run log shows (DVCLive keeps every key)
PROGRESS_KEYS = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "train_tokens_per_second")

log = logging.getLogger(STAGE)


# ---------------------------------------------------------------------------- data
def load_sft_rows(path: Path, system_prompt: str) -> List[Dict[str, Any]]:
    """Read and check the SFT dataset: a list of {"messages": [...]} rows.

    Each row must open with the spec-free system prompt of params (so SFT, RL and evaluation see the same one) and end
    with an assistant turn in the `<think>...</think> answer` format.

    Raises:
        PipelineError: naming the file and line.
    """
    rows = []
    for n, row in iter_jsonl(path, "SFT dataset (run sft_dataset first)"):
        where = f"{path}:{n}"
        msgs = row.get("messages")
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise PipelineError(f"{where}: 'messages' must be a list of at least 2 turns")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
                m.get("content"), str
            ):
                raise PipelineError(f"{where}: each message needs a role (system/user/assistant) and string content")
        if msgs[0]["role"] != "system" or msgs[0]["content"] != system_prompt:
            raise PipelineError(
                f"{where}: first turn is not the system prompt of params sft_dataset.system_prompt (re-run sft_dataset)"
            )
        if msgs[-1]["role"] != "assistant":
            raise PipelineError(f"{where}: last turn must be the assistant's")
        parsed = split_cot(msgs[-1]["content"])
        if not parsed.ok:
            raise PipelineError(f"{where}: assistant turn is not '<think>CoT</think> answer' ({parsed.problem})")
        rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]})
    if not rows:
        raise PipelineError(f"{path}: no rows")
    return rows


@dataclass(frozen=True)
class DataPlan:
    rows: int
    tokens: int  # template-rendered tokens of every row, before truncation
    truncated_rows: int  # rows longer than max_length: their end (answer, end-of-turn) is cut
    steps: int  # optimiser steps the run will take


def plan_steps(n_rows: int, global_batch: int, epochs: float, max_steps: Optional[int]) -> int:
    """Optimiser steps for `epochs` passes over `n_rows` (last batch may be short), capped by `max_steps`."""
    total = math.ceil(math.ceil(n_rows / global_batch) * epochs)
    return max(1, min(total, max_steps) if max_steps else total)


def plan_data(rows: List[Dict[str, Any]], tokenizer: Any, template: str, section: SftCheckpointParams, world: int) -> DataPlan:
    """Count tokens, truncated rows and steps; refuse a dataset smaller than one global batch. No model needed."""
    global_batch = section.per_device_batch_size * section.gradient_accumulation_steps * world
    if len(rows) < global_batch:
        raise PipelineError(
            f"sft_checkpoint: {len(rows)} training rows is less than one global batch of {global_batch} "
            f"(per_device_batch_size {section.per_device_batch_size} x gradient_accumulation_steps "
            f"{section.gradient_accumulation_steps} x {world} processes)"
        )
    lengths = [len(tokenizer.apply_chat_template(r["messages"], chat_template=template, tokenize=True,
                                                 return_dict=True)["input_ids"]) for r in rows]
    truncated = sum(n > section.max_length for n in lengths)
    # with packing, a batch row is a max_length block of several examples
    units = math.ceil(sum(min(n, section.max_length) for n in lengths) / section.max_length) if section.packing else len(rows)
    return DataPlan(len(rows), sum(lengths), truncated, plan_steps(units, global_batch, section.epochs, section.max_steps))


# ---------------------------------------------------------------------------- trainer
def sft_config(section: SftCheckpointParams, work_dir: Path, steps: int):
    """trl.SFTConfig from our params plus `trl_extra` (built before any compute: a bad field fails at once; and before
    loading the model: ZeRO-3 needs it to shard the load).

    Raises:
        PipelineError: naming the params key (`sft_checkpoint.trl_extra.<field>` for the free-form part).
    """
    from trl import SFTConfig

    return build_trl_config(SFTConfig, section, STAGE, dict(
        **trainer_kwargs(section, work_dir),
        max_steps=steps,
        num_train_epochs=section.epochs,
        max_length=section.max_length,
        packing=section.packing,
        loss_type=section.loss_type,
        assistant_only_loss=True,  # loss on the {% generation %} span: CoT + answer + <|im_end|>
        include_num_input_tokens_seen="non_padding",  # kept in trainer_state, so it survives a resume
    ))


def build_sft_trainer(model: Any, tokenizer: Any, template: str, rows: List[Dict[str, Any]], args: Any, peft_config=None,
                      callbacks: Optional[List[Any]] = None):
    """An SFTTrainer on conversational rows; `tokenizer`, with `template` set on it, is the processing_class."""
    from datasets import Dataset
    from trl import SFTTrainer

    tokenizer.chat_template = template  # saved with the checkpoint: RL and evaluation render prompts with it
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------- stage
def main(
    params: Params,
    base_dir: Path = catalog.BASE_MODEL,
    dataset: Path = catalog.SFT_TRAIN,
    out_dir: Path = catalog.SFT_CHECKPOINT,
    metrics_path: Path = catalog.SFT_CHECKPOINT_METRICS,
    live_dir: Path = catalog.dvclive(STAGE),
) -> Optional[Dict[str, Any]]:
    """Check inputs and config, (re)launch if asked, train, then write checkpoint, metrics and DVCLive logs (rank 0).

    Returns:
        The metrics dict on rank 0 of the process that trained; None in the process that only launched others.
    """
    from transformers import AutoTokenizer

    section = params.sft_checkpoint
    clock = Stopwatch()
    work_dir = Path(params.paths.work) / STAGE

    # -- inputs and config, before any compute
    require_model_dir(Path(base_dir), STAGE, "base_model")
    rows = load_sft_rows(Path(dataset), params.sft_dataset.system_prompt)
    machine_preflight(section, STAGE)
    if section.packing and section.device == "cpu":
        log.warning("sft_checkpoint.packing on CPU: TRL packs padding-free, so attention spans whole packed blocks; "
                    "measured x0.74-0.97 the tokens/s of padding and x1.7-2.3 its peak memory (bench/bench_sft.py)")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    template = training_chat_template(tokenizer, params.sft_dataset.system_prompt, section.chat_template)
    plan = plan_data(rows, tokenizer, template, section, planned_world_size(section))
    if plan.truncated_rows:
        log.warning("%d of %d rows are longer than max_length %d and lose their end", plan.truncated_rows, plan.rows,
                    section.max_length)
    args = sft_config(section, work_dir, plan.steps)
    if relaunch(STAGE, params, section, work_dir):
        return None

    # -- train (resuming from the last trainer checkpoint of the same run, if any)
    run_id = fingerprint({"params": section.model_dump(mode="json"), "system_prompt": params.sft_dataset.system_prompt,
                          "dataset": file_digest(Path(dataset)), "base_model": dir_digest(Path(base_dir))})
    resume = prepare_work_dir(work_dir, run_id)
    with dagster_pipes_channel() as pipes:
        live_staging = work_dir / "dvclive"  # moved to live_dir once the checkpoint is in place
        callbacks = [dvclive_callback(live_staging)]
        progress = pipes_callback(pipes, STAGE, PROGRESS_KEYS) if pipes else None
        model = load_model(Path(base_dir))
        trainer = build_sft_trainer(model, tokenizer, template, rows, args, lora_config(section),
                                    callbacks=callbacks + ([progress] if progress else []))
        train_clock = Stopwatch()
        trainer.train(resume_from_checkpoint=resume)
        train_time = train_clock()

        # -- outputs: nothing here may differ between two runs of the same inputs (no times, no resume point)
        curve = step_rows(trainer.state.log_history, need="loss")
        metrics = {
            "final_loss": curve[-1]["loss"] if curve else None,
            "first_loss": curve[0]["loss"] if curve else None,
            # mean of the logged step losses (the trainer's own training_loss covers its last train() call only)
            "train_loss": statistics.fmean(r["loss"] for r in curve) if curve else None,
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0.0, 4),
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "train_samples": plan.rows,
            "dataset_tokens": plan.tokens,  # all rows once, before truncation
            "truncated_rows": plan.truncated_rows,
        }
        summary = {
            "stage": STAGE,
            "base_model": str(base_dir),
            "dataset": str(dataset),
            "seed": section.seed,
            "params": section.model_dump(mode="json"),
            "metrics": metrics,
            "loss_curve": curve,
            "world_size": trainer.args.world_size,
            "packages": package_versions(),
        }
        publish_checkpoint(trainer, tokenizer, Path(out_dir), summary)
        if not is_rank_zero():
            return None
        write_json(metrics_path, metrics)
        publish_dir(live_staging, Path(live_dir))
        finish_work_dir(work_dir, section.keep_checkpoints)
        timings.record(STAGE, params.paths.work, train_s=train_time, wall_s=clock(),
                       resumed_from=Path(resume).name if resume else None)
        if progress is not None:
            pipes.report_custom_message({"metadata": {"training/steps": metrics["steps"],
                                                      "training/last_step": progress.last}})
        log.info("sft_checkpoint: %s", metrics)
        return metrics
