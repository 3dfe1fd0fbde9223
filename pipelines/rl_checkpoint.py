"""rl_checkpoint: GRPO (TRL GRPOTrainer) from the SFT model, with the spec-aware judge as reward.

    python -m pipelines rl_checkpoint                        # what `dvc repro rl_checkpoint` runs
    # multi-GPU: set rl_checkpoint.launcher (accelerate | deepspeed) in params.yaml; the command re-runs itself
    #            under `accelerate launch --config_file configs/<x>.yaml -m pipelines rl_checkpoint`

Reads  data/sft_checkpoint/, the training prompts data/prompts/<category>.jsonl and the spec (paths.spec).
Writes data/rl_checkpoint/ (model, tokenizer, training_summary.json), data/metrics/rl_checkpoint.json (headline figures)
       and data/dvclive/rl_checkpoint/ (DVCLive: every key GRPO logs per step, plots/metrics/<key>.tsv: reward,
       reward_std, rewards/<reward function>/mean, frac_reward_zero_std, kl, completions/..., and their last values,
       metrics.json). No wall-clock time goes into any of them: times go to paths.work/timings/.
When Dagster runs the stage, rank 0 also sends one line per step (reward, loss, learning rate, ...) to the run log.

The policy sees the same spec-free system prompt as in SFT and must recall the spec itself. Each completion is split
into CoT and answer (`pipelines.cot.split_cot`); the judge gets the prompt, spec(category) and the ANSWER ONLY
(`JudgeItem.cot=None`, and the judge params must say `sees_cot: false`), as in the paper, so RL cannot teach the CoT
to please the judge. A completion whose CoT never closes cannot be split, scores 0 and is not shown to the judge.
reward = judge score / 10 (graded, so a group of completions differs) + format_weight x (well-formed <think> + answer)
       + behaviour_weight x (+1 the behaviour the prompt's label asks for, -1 the opposite: refusing a benign
       look-alike costs) - repetition_weight x (the completion loops, pipelines.repetition).
Every generation batch mixes harmful and benign prompts in a fixed share (harmful_share; `mixed_order`).
"""
from __future__ import annotations

import logging
import math
import random
import statistics
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from . import catalog, timings
from .cot import split_cot
from .errors import PipelineError
from .io import write_json
from .params import Params
from .params.training import RlCheckpointParams
from .training_common import (
    Stopwatch,
    build_trl_config,
    dagster_pipes_channel,
    dir_digest,
    dvclive_callback,
    file_digest,
    finish_work_dir,
    fingerprint,
    first_last,
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
)

STAGE = "rl_checkpoint"

log = logging.getLogger(STAGE)


# ---------------------------------------------------------------------------- prompts
def select_prompts(params: Params, spec: Any) -> List[Any]:
    """The training prompts RL samples from: the first `max_prompts_per_category` rows of each category's file."""
    from .prompts import load_prompts

    cap, out = params.rl_checkpoint.max_prompts_per_category, []
    for cat in params.categories:
        out += load_prompts(Path(params.paths.prompts) / f"{cat}.jsonl", spec, cat)[:cap]
    return out


HARMFUL = ("refuse", "safe_complete")  # the harmful side of the RL mix; `comply` prompts are the benign side


def mixed_order(prompts: Sequence[Any], per_batch: int, harmful_share: float, seed: int = 0) -> List[Any]:
    """The prompts in an order where every run of `per_batch` (one generation batch) holds a fixed harmful/benign mix.

    Slot j is harmful when floor((j + 1) x share) > floor(j x share): harmful prompts spread evenly, so a batch holds
    share x per_batch of them, rounded down or up (share 0.5, 2 per batch: one of each). Each side is shuffled once
    (seeded) and cycled while the other side still has unseen prompts: every prompt comes at least once, and the
    sequence ends on a whole batch (TRL drops a partial one).

    Raises:
        PipelineError: the mix needs a side that has no prompts.
    """
    share = Fraction(harmful_share).limit_denominator(1000)  # exact slot arithmetic (0.3 x 10 is 3, not 3.0000001)
    harmful = [p for p in prompts if p.expected in HARMFUL]
    benign = [p for p in prompts if p.expected not in HARMFUL]
    for side, pool, needed in (("harmful (expected refuse or safe_complete)", harmful, share > 0),
                               ("benign (expected comply)", benign, share < 1)):
        if needed and not pool:
            raise PipelineError(f"rl_checkpoint.harmful_share {harmful_share} needs {side} prompts; "
                                f"the {len(prompts)} prompts selected have none")
    rng = random.Random(seed)
    rng.shuffle(harmful)
    rng.shuffle(benign)
    need_h, need_b = (len(harmful) if share > 0 else 0), (len(benign) if share < 1 else 0)
    n = per_batch
    while math.floor(n * share) < need_h or n - math.floor(n * share) < need_b:
        n += per_batch
    out, taken = [], {True: 0, False: 0}
    for j in range(n):
        is_harmful = math.floor((j + 1) * share) > math.floor(j * share)
        pool = harmful if is_harmful else benign
        out.append(pool[taken[is_harmful] % len(pool)])
        taken[is_harmful] += 1
    return out


def rl_rows(prompts: Sequence[Any], system_prompt: str, per_batch: Optional[int] = None,
            harmful_share: Optional[float] = None, seed: int = 0) -> List[Dict[str, Any]]:
    """GRPO dataset rows: a conversational `prompt` (system + user) plus the columns the reward needs.

    With `per_batch` and `harmful_share` the rows follow `mixed_order` (TRL must then keep the dataset order:
    grpo_config turns its shuffle off); without, the prompts' own order, shuffled by TRL."""
    if per_batch is not None and harmful_share is not None:
        prompts = mixed_order(prompts, per_batch, harmful_share, seed)
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


def answer_of(completion: Any) -> Optional[str]:
    """The answer after the CoT, or None when there is none to score: the CoT never closes (CoT and answer cannot be
    told apart) or nothing follows it."""
    parsed = split_cot(completion_text(completion))
    if parsed.problem == "no_close_tag" or not parsed.answer:
        return None
    return parsed.answer


def behaviour_score(answer: Optional[str], prompt: str, expected: str) -> float:
    """+1 when the answer behaves as the prompt's label asks, -1 when it does the opposite, 0 without an answer.

    refuse: +1 for a refusal (pipelines.refusal.is_refusal, the reading evaluation uses). comply: +1 for an answer
    that is not a refusal, so refusing a benign look-alike costs as much as answering a harmful prompt. safe_complete:
    +1 when the answer points to support (RESOURCES: 988, a crisis line, a doctor, someone trusted), -1 otherwise."""
    from .refusal import RESOURCES, is_refusal

    if answer is None:
        return 0.0
    if expected == "safe_complete":
        ok = bool(RESOURCES.search(answer))
    else:
        ok = is_refusal(answer, prompt) == (expected == "refuse")
    return 1.0 if ok else -1.0


def make_reward_funcs(judge: Any, spec_chunks: Mapping[str, str]) -> List[Callable[..., List[float]]]:
    """[judge_reward, format_reward, behaviour_reward, repetition_reward] in the signature GRPOTrainer calls
    (prompts, completions, **dataset columns); `reward_weights(section)` gives their weights, in this order.

    `judge` is anything with `score(items, progress=...) -> [Verdict]` (pipelines.judges); it receives one JudgeItem
    per completion that has an answer, with the answer and `cot=None`. The function names are the GRPO log keys.
    """
    from .judges import JudgeItem
    from .repetition import is_degenerate

    def judge_reward(prompts, completions, user_prompt, category, expected, policy, **_: Any) -> List[float]:
        rewards = [0.0] * len(completions)
        items, where = [], []
        for i, c in enumerate(completions):
            answer = answer_of(c)
            if answer is None:
                continue  # no answer to judge, or CoT and answer cannot be told apart: never show it to the judge
            items.append(JudgeItem(
                prompt=user_prompt[i],
                category=category[i],
                expected=expected[i],
                policy=policy[i] or None,
                spec=spec_chunks[category[i]],
                answer=answer,
                cot=None,
            ))
            where.append(i)
        if items:
            for i, verdict in zip(where, judge.score(items, progress=False)):
                rewards[i] = float(verdict.score) / 10.0
        return rewards

    def format_reward(prompts, completions, **_: Any) -> List[float]:
        return [1.0 if split_cot(completion_text(c)).ok else 0.0 for c in completions]

    def behaviour_reward(prompts, completions, user_prompt, expected, **_: Any) -> List[float]:
        # the judge's score alone pays a short refusal of a benign prompt more than a helpful answer cut off by the
        # token budget (which scores 0): this term makes the refusal cost, and the refusal of a harmful prompt pay
        return [behaviour_score(answer_of(c), user_prompt[i], expected[i]) for i, c in enumerate(completions)]

    def repetition_reward(prompts, completions, **_: Any) -> List[float]:
        # the whole completion: a loop in the CoT is as degenerate as one in the answer (and usually never closes)
        return [-1.0 if is_degenerate(completion_text(c)) else 0.0 for c in completions]

    return [judge_reward, format_reward, behaviour_reward, repetition_reward]


def reward_weights(section: RlCheckpointParams) -> List[float]:
    """GRPOConfig.reward_weights for `make_reward_funcs`, in its order: the judge's 0..1 score counts once."""
    return [1.0, section.format_weight, section.behaviour_weight, section.repetition_weight]


# ---------------------------------------------------------------------------- trainer
def grpo_config(section: RlCheckpointParams, work_dir: Path):
    """trl.GRPOConfig from our params plus `trl_extra` (built before any compute: a bad field fails at once; and before
    loading the model: ZeRO-3 needs it to shard the load).

    Raises:
        PipelineError: naming the params key (`rl_checkpoint.trl_extra.<field>` for the free-form part).
    """
    from trl import GRPOConfig

    return build_trl_config(GRPOConfig, section, STAGE, dict(
        **trainer_kwargs(section, work_dir),
        max_steps=section.max_steps,
        num_generations=section.num_generations,
        max_completion_length=section.max_completion_length,
        temperature=section.temperature,
        top_p=section.top_p,
        beta=section.beta,
        reward_weights=reward_weights(section),
        shuffle_dataset=section.harmful_share is None,  # rl_rows orders the rows into mixed batches: keep that order
        loss_type=section.loss_type,
        use_vllm=section.use_vllm,
        vllm_mode=section.vllm_mode,
        log_completions=section.log_completions,
    ))


def progress_keys(reward_funcs: Sequence[Callable]) -> List[str]:
    """What each step's line in the Dagster run log shows (DVCLive keeps every key); TRL logs each reward function's
    mean under rewards/<its __name__>/mean."""
    return ["reward", "reward_std", *[f"rewards/{f.__name__}/mean" for f in reward_funcs], "frac_reward_zero_std",
            "loss", "learning_rate", "step_time"]


def build_grpo_trainer(model: Any, tokenizer: Any, rows: List[Dict[str, Any]], reward_funcs: List[Callable], args: Any,
                       peft_config=None, callbacks: Optional[List[Any]] = None):
    from datasets import Dataset
    from trl import GRPOTrainer

    return GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------- stage
def main(
    params: Params,
    model_dir: Path = catalog.SFT_CHECKPOINT,
    out_dir: Path = catalog.RL_CHECKPOINT,
    metrics_path: Path = catalog.RL_CHECKPOINT_METRICS,
    live_dir: Path = catalog.dvclive(STAGE),
    judge: Any = None,
) -> Optional[Dict[str, Any]]:
    """Check inputs and config, (re)launch if asked, run GRPO, then write checkpoint, metrics and DVCLive logs (rank 0).

    `judge` overrides the one built from params (tests); the CLI never passes it.

    Returns:
        The metrics dict on rank 0 of the process that trained; None in the process that only launched others.
    """
    from transformers import AutoTokenizer

    from .judges import make_judge
    from .spec import load_spec

    section = params.rl_checkpoint
    clock = Stopwatch()
    work_dir = Path(params.paths.work) / STAGE

    # -- inputs and config, before any compute
    require_model_dir(Path(model_dir), STAGE, "sft_checkpoint")
    spec = load_spec(params.paths.spec, params.categories)
    prompt_files = [Path(params.paths.prompts) / f"{c}.jsonl" for c in params.categories]
    prompts = select_prompts(params, spec)
    machine_preflight(section, STAGE)
    per_batch = prompts_per_generation(section, planned_world_size(section))
    if len(prompts) < per_batch:
        raise PipelineError(f"rl_checkpoint: {len(prompts)} prompts is less than one generation batch of {per_batch}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(f"{model_dir}: the tokenizer has no chat template (re-run sft_checkpoint)")
    args = grpo_config(section, work_dir)
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
    resume = prepare_work_dir(work_dir, run_id)
    judge = judge if judge is not None else make_judge(section.judge, spec)
    rewards = make_reward_funcs(judge, {c: spec.chunk(c) for c in params.categories})
    rows = rl_rows(prompts, params.sft_dataset.system_prompt, per_batch, section.harmful_share, section.seed)
    with dagster_pipes_channel() as pipes:
        live_staging = work_dir / "dvclive"  # moved to live_dir once the checkpoint is in place
        progress = pipes_callback(pipes, STAGE, progress_keys(rewards)) if pipes else None
        model = load_model(Path(model_dir))
        trainer = build_grpo_trainer(model, tokenizer, rows, rewards,
                                     args, lora_config(section),
                                     callbacks=[dvclive_callback(live_staging)] + ([progress] if progress else []))
        train_clock = Stopwatch()
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            if hasattr(judge, "close"):
                judge.close()
        train_time = train_clock()

        # -- outputs: nothing here may differ between two runs of the same inputs (no times, no resume point)
        curve = step_rows(trainer.state.log_history, need="reward")
        zero_std = [r["frac_reward_zero_std"] for r in curve if "frac_reward_zero_std" in r]
        metrics: Dict[str, Any] = {f"reward_{k}": v for k, v in first_last(curve, "reward").items()}
        for f in rewards:  # judge_first, judge_last, format_first, ...
            name = f.__name__.removesuffix("_reward")
            metrics.update({f"{name}_{k}": v for k, v in first_last(curve, f"rewards/{f.__name__}/mean").items()})
        metrics.update({
            "frac_reward_zero_std_mean": statistics.fmean(zero_std) if zero_std else None,
            "steps": trainer.state.global_step,
            "prompts": len(prompts),
            "completions_per_step": per_batch * section.num_generations,
        })
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
            "datasets": [str(p) for p in prompt_files],
            "spec": str(params.paths.spec),
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
        log.info("rl_checkpoint: %s", metrics)
        return metrics
