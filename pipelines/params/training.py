"""params.yaml sections of the training stages (sft_checkpoint, rl_checkpoint).

The defaults are sized for the embedded default: SmolLM2-135M on an idle 2-core CPU, each stage in ~2-3 minutes.
Reference costs there: SFT ~4.6 s per step of 4 rows x 256 tokens; GRPO ~12-15 s per step of 2 prompts x 4
completions x 32 tokens. Our default 96-token completions cost more (estimate: ~20-30 s/step idle; on a busy shared
CPU we measured 160 tokens at 1.5x the step time of 96). Cost is about linear in steps x batch x tokens.
On GPUs, raise the step counts and set `device: cuda`, `precision: bf16`, and a multi-GPU `launcher` (README).

Checks that only need these values live here (pydantic); checks that need the machine or other files (CUDA present,
DeepSpeed installed, the launcher config's ZeRO stage, dataset size) run in `pipelines.training_common.preflight`,
still before any model is loaded.
"""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .common import Fraction, JudgeParams, PositiveInt, Seed, Strict

# Every float here is finite (Strict refuses inf/nan) and bounded above where a value beyond the bound is a mistake.
PositiveFloat = Annotated[float, Field(gt=0.0)]
LearningRate = Annotated[float, Field(gt=0.0, le=1.0)]
Temperature = Annotated[float, Field(gt=0.0, le=100.0)]


class LoraParams(Strict):
    """LoRA adapters (peft). The output checkpoint always has the adapters merged in, so later stages load a plain model."""

    enabled: bool = False  # full fine-tuning by default: 135M parameters fit anywhere
    r: PositiveInt = 16  # adapter rank
    alpha: PositiveInt = 32  # scaling = alpha / r
    dropout: Fraction = 0.05
    # names of the linear layers that get adapters (Llama naming); ["all-linear"] = every linear layer but the head
    target_modules: Annotated[List[str], Field(min_length=1)] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]


class TrainingStageParams(Strict):
    """What both training stages share: where and how to run, the optimiser, logging and checkpointing."""

    # -------------------------------------------------------------------- launch
    # python: train in this process. accelerate: re-run the stage under `accelerate launch` with a DDP config.
    # deepspeed: the same with a DeepSpeed ZeRO config (needs `pip install .[gpu]` and CUDA).
    launcher: Literal["python", "accelerate", "deepspeed"] = "python"
    # accelerate config file; None = configs/accelerate_ddp.yaml (accelerate) or configs/zero2.yaml (deepspeed)
    launcher_config: Optional[str] = None
    num_processes: Optional[PositiveInt] = None  # processes (GPUs) per machine; None = every visible GPU
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # auto = cuda when present; cpu keeps the default run reproducible
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # mixed precision; bf16/fp16 need CUDA (TRL defaults to bf16!)
    gradient_checkpointing: bool = False  # trades ~20% more compute for activation memory; a 135M model needs none

    # -------------------------------------------------------------------- optimiser
    learning_rate: LearningRate = 5e-5
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1  # fraction of the steps spent warming up
    max_grad_norm: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0
    # AdamW as one fused kernel (CPU and CUDA); measured on the 135M model on 2 CPU cores: 0.06 s vs 0.26 s per step
    optim: Literal["adamw_torch_fused", "adamw_torch"] = "adamw_torch_fused"
    per_device_batch_size: PositiveInt = 4  # rows per process per micro-step
    gradient_accumulation_steps: PositiveInt = 1  # micro-steps per optimiser step
    seed: Seed = 0  # data order, dropout, LoRA init and (RL) sampling

    # -------------------------------------------------------------------- logging and checkpoints
    logging_steps: PositiveInt = 1  # optimiser steps between log rows (the loss/reward curve); logging is cheap
    save_steps: PositiveInt = 10  # steps between resumable trainer checkpoints in paths.work/<stage>/
    save_total_limit: PositiveInt = 1  # trainer checkpoints kept; each holds weights + optimiser state (~1.6 GB at 135M)
    keep_checkpoints: bool = False  # keep paths.work/<stage>/ after a successful run (False frees the disk)
    # Curves and metrics always go through DVCLive into data/dvclive/<stage>/ (nothing to switch on here).

    lora: LoraParams = LoraParams()
    # Further trl.SFTConfig / trl.GRPOConfig fields, passed as they are (e.g. {vllm_server_host: 10.0.0.5,
    # vllm_gpu_memory_utilization: 0.5}). Checked by building the config before any compute: an unknown field, a field
    # the typed keys above already set, or a value TRL refuses is a one-line error naming `<stage>.trl_extra.<field>`.
    trl_extra: Dict[str, Any] = {}

    @model_validator(mode="after")
    def _precision_needs_gpu(self) -> "TrainingStageParams":
        if self.device == "cpu" and self.precision != "fp32":
            raise ValueError(
                f"precision {self.precision!r} needs a GPU but device is 'cpu': set precision: fp32, or device: cuda"
            )
        return self


class SftCheckpointParams(TrainingStageParams):
    """Supervised fine-tuning on the spec-free chat examples; loss on the assistant turn (CoT + answer) only."""

    # passes over the data, capped by max_steps: ~30 steps x ~4.6 s on 2 CPU cores = ~2.3 min. The default run keeps
    # ~12 examples, and one pass over them does not teach the <think> format
    epochs: Annotated[float, Field(gt=0.0, le=10_000.0)] = 8.0
    max_steps: Optional[PositiveInt] = 30  # cap on optimiser steps; None = run every epoch in full
    max_length: PositiveInt = 512  # tokens per row (system + prompt + CoT + answer); longer rows are cut, and counted
    packing: bool = False  # pack rows into max_length blocks (faster on GPU; changes per-row loss weighting)
    # A .jinja chat template with {% generation %} markers around the assistant turn. None = the built-in ChatML one
    # (SmolLM2, Qwen, ...), which is checked to render exactly like the base model's own template.
    chat_template: Optional[str] = None
    loss_type: Literal["nll", "dft"] = "nll"  # TRL's SFT loss: nll (plain cross-entropy) or dft (Dynamic Fine-Tuning)


class RlCheckpointParams(TrainingStageParams):
    """GRPO from the SFT model on spec-free prompts; reward = judge score of the answer (CoT withheld) + format bonus
    + behaviour term (right refusal / right answer) - repetition penalty, on a harmful / benign mix per batch."""

    # 6 steps x ~20-30 s on 2 idle CPU cores = ~2-3 min (estimate, see the module docstring)
    learning_rate: LearningRate = 5e-6  # RL moves a trained policy: 10x below SFT
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"  # few steps: no decay
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # with 6 steps, a warmup step would be a step at lr 0
    max_steps: PositiveInt = 6  # optimiser steps (each: generate, score, update)
    # completions per process per micro-step (not prompts!): 8 = 2 prompts x num_generations 4
    per_device_batch_size: PositiveInt = 8
    save_steps: PositiveInt = 2  # a GRPO step is slow on CPU; lose at most 2 after a kill
    num_generations: Annotated[int, Field(ge=2, le=1024)] = 4  # group size: completions per prompt that GRPO compares
    # tokens per completion (CoT + answer). A CoT cut before </think> has no answer and scores 0, which also rewards
    # finishing within budget; generation and the update both grow with it (160 costs ~1.5x of 96 per step)
    max_completion_length: PositiveInt = 96
    temperature: Temperature = 0.9  # sampling temperature; must be > 0 so a group's completions differ
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    beta: Annotated[float, Field(ge=0.0, le=1e3)] = 0.0  # KL penalty to the SFT model; 0 skips the reference model
    # The reward judge. It never sees the CoT (the paper's choice, so RL cannot teach the CoT to please the judge).
    judge: JudgeParams = JudgeParams(sees_cot=False)
    format_weight: Annotated[float, Field(ge=0.0, le=1e3)] = 0.2  # reward = judge score / 10 + format_weight * well-formed
    # + behaviour_weight * (+1 the behaviour the prompt's label asks for, -1 the opposite, 0 no answer): refusing a
    # benign prompt costs as much as answering a harmful one, so refusing everything does not pay
    behaviour_weight: Annotated[float, Field(ge=0.0, le=1e3)] = 1.0
    repetition_weight: Annotated[float, Field(ge=0.0, le=1e3)] = 0.5  # - repetition_weight for a looping completion
    # share of harmful prompts (expected refuse / safe_complete) in every generation batch, the rest benign
    # look-alikes; None = TRL's shuffle of all prompts, whatever the mix
    harmful_share: Optional[Fraction] = 0.5
    max_prompts_per_category: Optional[PositiveInt] = 14  # first N rows of each prompts file; None = every prompt
    # How the GRPO loss is normalised (TRL's names; dapo = TRL's default: per active token of the global batch)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = "dapo"
    # Generate completions with vLLM (GPU only; `pip install vllm`). colocate: vLLM shares the training GPUs;
    # server: a separate `trl vllm-serve` (host/port through trl_extra: vllm_server_host, vllm_server_port)
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    log_completions: bool = False  # print a sample of (prompt, completion) pairs every logging step

    @field_validator("judge")
    @classmethod
    def _judge_blind_to_cot(cls, v: JudgeParams) -> JudgeParams:
        if v.sees_cot:
            raise ValueError("sees_cot must be false: the RL reward judges the answer only, never the CoT")
        return v
