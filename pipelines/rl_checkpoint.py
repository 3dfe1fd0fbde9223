"""rl_checkpoint: GRPO (TRL GRPOTrainer) from the SFT model, with the spec-aware judge as reward.

    python -m pipelines rl_checkpoint                        # what `dvc repro rl_checkpoint` runs
    # multi-GPU: set rl_checkpoint.launcher (accelerate | deepspeed) in params.yaml; the command re-runs itself
    #            under `accelerate launch --config_file configs/<x>.yaml -m pipelines rl_checkpoint`

Reads  data/sft_checkpoint/, the training prompts data/prompts/<category>.jsonl and the spec (paths.spec).
Writes data/rl_checkpoint/ (model, tokenizer, training_summary.json), data/metrics/rl_checkpoint.json and
       data/plots/rl_checkpoint/reward.csv (per step: reward mean/std, share of groups with no reward spread, ...).

The policy sees the same spec-free system prompt as in SFT and must recall the spec itself. Each completion is split
into CoT and answer (`pipelines.cot.split_cot`); the judge gets the prompt, spec(category) and the ANSWER ONLY
(`JudgeItem.cot=None`, and the judge params must say `sees_cot: false`), as in the paper, so RL cannot teach the CoT
to please the judge. A completion whose CoT never closes cannot be split, scores 0 and is not shown to the judge.
reward = judge score / 10 (graded, so a group of completions differs) + format_weight x (well-formed <think> + answer).
"""
from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .cot import split_cot
from .errors import PipelineError
from .io import write_json
from .params import Params
from .params.training import RlCheckpointParams
from .training_common import (
    Stopwatch,
    dir_digest,
    file_digest,
    finish_work_dir,
    fingerprint,
    is_rank_zero,
    load_model,
    log_rows,
    lora_config,
    machine_preflight,
    package_versions,
    planned_world_size,
    prepare_work_dir,
    publish_checkpoint,
    relaunch,
    require_model_dir,
    trainer_kwargs,
    write_csv,
)

STAGE = "rl_checkpoint"
SFT_MODEL = Path("data/sft_checkpoint")
OUT = Path("data/rl_checkpoint")
METRICS = Path("data/metrics/rl_checkpoint.json")
PLOTS = Path("data/plots/rl_checkpoint")
# reward.csv column: key in TRL's GRPO logs (reward functions are logged under their __name__)
REWARD_COLUMNS = {
    "reward_mean": "reward",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "frac_reward_zero_std",
    "judge_mean": "rewards/judge_reward/mean",
    "format_mean": "rewards/format_reward/mean",
    "kl": "kl",
    "completion_mean_length": "completions/mean_length",
    "clipped_ratio": "completions/clipped_ratio",
    "loss": "loss",
    "learning_rate": "learning_rate",
}

log = logging.getLogger(STAGE)


# ---------------------------------------------------------------------------- prompts
def rl_rows(prompts: Sequence[Any], system_prompt: str) -> List[Dict[str, Any]]:
    """GRPO dataset rows: a conversational `prompt` (system + user) plus the columns the reward needs."""
    return [
        {
            "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": p.prompt}],
            "user_prompt": p.prompt,
            "category": p.category,
            "expected": p.expected,
            "policy": p.policy,
            "prompt_id": p.id,
        }
        for p in prompts
    ]


def prompts_per_generation(section: RlCheckpointParams, world: int) -> int:
    """Distinct prompts in one generation batch; refuses a batch that does not hold whole groups.

    TRL's per_device_train_batch_size counts completions: the generation batch is
    per_device_batch_size x processes x gradient_accumulation_steps completions, num_generations per prompt.
    """
    completions = section.per_device_batch_size * world * section.gradient_accumulation_steps
    if completions % section.num_generations:
        raise PipelineError(
            f"rl_checkpoint: per_device_batch_size {section.per_device_batch_size} x {world} processes x "
            f"gradient_accumulation_steps {section.gradient_accumulation_steps} = {completions} completions per "
            f"generation batch, not a multiple of num_generations {section.num_generations}"
        )
    return completions // section.num_generations


# ---------------------------------------------------------------------------- rewards
def completion_text(completion: Any) -> str:
    """The assistant text of a completion: a string, or (conversational) a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def make_reward_funcs(judge: Any, spec_chunks: Mapping[str, str]) -> List[Callable[..., List[float]]]:
    """[judge_reward, format_reward] in the signature GRPOTrainer calls (prompts, completions, **dataset columns).

    `judge` is anything with `score(items, progress=...) -> [Verdict]` (pipelines.judges); it receives one JudgeItem
    per completion that can be split, with the answer and `cot=None`. The function names are the GRPO log keys.
    """
    from .judges import JudgeItem

    def judge_reward(prompts, completions, user_prompt, category, expected, policy, **_: Any) -> List[float]:
        rewards = [0.0] * len(completions)
        items, where = [], []
        for i, c in enumerate(completions):
            parsed = split_cot(completion_text(c))
            if parsed.problem == "no_close_tag" or not parsed.answer:
                continue  # no answer to judge, or CoT and answer cannot be told apart: never show it to the judge
            items.append(JudgeItem(
                prompt=user_prompt[i],
                category=category[i],
                expected=expected[i],
                policy=policy[i] or None,
                spec=spec_chunks[category[i]],
                answer=parsed.answer,
                cot=None,
            ))
            where.append(i)
        if items:
            for i, verdict in zip(where, judge.score(items, progress=False)):
                rewards[i] = float(verdict.score) / 10.0
        return rewards

    def format_reward(prompts, completions, **_: Any) -> List[float]:
        return [1.0 if split_cot(completion_text(c)).ok else 0.0 for c in completions]

    return [judge_reward, format_reward]


# ---------------------------------------------------------------------------- trainer
def grpo_config(section: RlCheckpointParams, work_dir: Path):
    """trl.GRPOConfig from our params (create it before loading the model: ZeRO-3 needs it to shard the load)."""
    from trl import GRPOConfig

    return GRPOConfig(
        **trainer_kwargs(section, work_dir),
        max_steps=section.max_steps,
        num_generations=section.num_generations,
        max_completion_length=section.max_completion_length,
        temperature=section.temperature,
        top_p=section.top_p,
        beta=section.beta,
        reward_weights=[1.0, section.format_weight],
    )


def build_grpo_trainer(model: Any, tokenizer: Any, rows: List[Dict[str, Any]], reward_funcs: List[Callable], args: Any,
                       peft_config=None):
    from datasets import Dataset
    from trl import GRPOTrainer

    return GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _first_last(curve: List[Dict[str, Any]], key: str) -> Dict[str, Optional[float]]:
    vals = [r[key] for r in curve if key in r]
    return {"first": vals[0] if vals else None, "last": vals[-1] if vals else None}


# ---------------------------------------------------------------------------- stage
def main(
    params: Params,
    model_dir: Path = SFT_MODEL,
    out_dir: Path = OUT,
    metrics_path: Path = METRICS,
    plots_dir: Path = PLOTS,
    judge: Any = None,
) -> Optional[Dict[str, Any]]:
    """Check inputs and config, (re)launch if asked, run GRPO, then write checkpoint, metrics and reward curve (rank 0).

    `judge` overrides the one built from params (tests); the CLI never passes it.

    Returns:
        The metrics dict on rank 0 of the process that trained; None in the process that only launched others.
    """
    from transformers import AutoTokenizer

    from .judges import make_judge
    from .prompts import load_prompts
    from .spec import load_spec

    section = params.rl_checkpoint
    clock = Stopwatch()
    work_dir = Path(params.paths.work) / STAGE

    # -- inputs and config, before any compute
    require_model_dir(Path(model_dir), STAGE, "sft_checkpoint")
    spec = load_spec(params.paths.spec, params.categories)
    prompt_files = [Path(params.paths.prompts) / f"{c}.jsonl" for c in params.categories]
    prompts = []
    for cat, path in zip(params.categories, prompt_files):
        prompts += load_prompts(path, spec, cat)[: section.max_prompts_per_category]
    machine_preflight(section, STAGE)
    per_batch = prompts_per_generation(section, planned_world_size(section))
    if len(prompts) < per_batch:
        raise PipelineError(f"rl_checkpoint: {len(prompts)} prompts is less than one generation batch of {per_batch}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(f"{model_dir}: the tokenizer has no chat template (re-run sft_checkpoint)")
    if relaunch(STAGE, params, section, work_dir):
        return None

    # -- train (resuming from the last trainer checkpoint of the same run, if any)
    run_id = fingerprint({
        "params": section.model_dump(mode="json"),
        "system_prompt": params.sft_dataset.system_prompt,
        "prompts": {str(p): file_digest(p) for p in prompt_files},
        "spec": {c: spec.chunk(c) for c in params.categories},
        "model": dir_digest(Path(model_dir)),
    })
    args = grpo_config(section, work_dir)
    resume = prepare_work_dir(work_dir, run_id)
    judge = judge if judge is not None else make_judge(section.judge, spec)
    rewards = make_reward_funcs(judge, {c: spec.chunk(c) for c in params.categories})
    model = load_model(Path(model_dir))
    trainer = build_grpo_trainer(model, tokenizer, rl_rows(prompts, params.sft_dataset.system_prompt), rewards, args,
                                 lora_config(section))
    train_clock = Stopwatch()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if hasattr(judge, "close"):
            judge.close()
    train_time = train_clock()

    # -- outputs
    curve = log_rows(trainer.state.log_history, REWARD_COLUMNS, need="reward")
    reward = _first_last(curve, "reward_mean")
    zero_std = [r["frac_reward_zero_std"] for r in curve if "frac_reward_zero_std" in r]
    metrics = {
        "reward_first": reward["first"],
        "reward_last": reward["last"],
        "judge_first": _first_last(curve, "judge_mean")["first"],
        "judge_last": _first_last(curve, "judge_mean")["last"],
        "format_first": _first_last(curve, "format_mean")["first"],
        "format_last": _first_last(curve, "format_mean")["last"],
        "frac_reward_zero_std_mean": statistics.fmean(zero_std) if zero_std else None,
        "steps": trainer.state.global_step,
        "prompts": len(prompts),
        "completions_per_step": per_batch * section.num_generations,
        "train_time_s": train_time,
        "wall_time_s": clock(),
        "resumed_from": Path(resume).name if resume else None,
    }
    summary = {
        "stage": STAGE,
        "model": str(model_dir),
        "seed": section.seed,
        "params": section.model_dump(mode="json"),
        "metrics": metrics,
        "reward_curve": curve,
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "world_size": trainer.args.world_size,
        "packages": package_versions(),
    }
    publish_checkpoint(trainer, tokenizer, Path(out_dir), summary)
    if is_rank_zero():
        metrics["wall_time_s"] = clock()
        write_json(metrics_path, metrics)
        write_csv(Path(plots_dir) / "reward.csv", curve, ["step", *REWARD_COLUMNS])
        finish_work_dir(work_dir, section.keep_checkpoints)
        log.info("rl_checkpoint: %s", metrics)
        return metrics
    return None
