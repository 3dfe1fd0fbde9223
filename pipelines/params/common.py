"""Building blocks shared by every params.yaml section: strict models, backends, sampling, judges.

Every model forbids unknown keys, so a typo in params.yaml is an error naming the key, never a silent default.
Every model is strict (a string is not an int, a float or a bool: "3" is an error, not 3) and every number is bounded
on both sides (no inf or nan anywhere; counts, seeds and durations have an upper bound), so a value that would run
away in CPU or memory, or fail only once training starts, is refused when params.yaml is read.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import catalog

# Upper bound of every count in params.yaml (samples, tokens, steps, batch sizes, shard sizes, ...): far above any
# sensible value, low enough that a typo such as 10**20 is refused instead of running away.
MAX_COUNT = 1_000_000
MAX_SEED = 2**31 - 1  # numpy/HF seeds must be < 2**32; stages add offsets (sample index, 1000 * shard) to the seed
MAX_SECONDS = 86_400.0  # timeouts, delays and back-offs: one day

PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
NonNegInt = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(gt=0.0, le=MAX_SECONDS)]  # a duration that must be positive (timeouts)
NonNegSeconds = Annotated[float, Field(ge=0.0, le=MAX_SECONDS)]
# The NAME of an environment variable, upper case by convention (MY_API_KEY). A key pasted here by mistake fails the
# pattern (keys are mixed case and often hold '-'), and the error never shows the value (see params._describe).
ENV_VAR_NAME = r"^[A-Z_][A-Z0-9_]{0,63}$"
EnvVarName = Annotated[str, Field(pattern=ENV_VAR_NAME)]


class Strict(BaseModel):
    """Base for every params section: unknown keys are errors and values are immutable once loaded.

    strict: no coercion between types (YAML gives real ints, floats and bools; "3" or "true" in quotes is a mistake).
    An int is still accepted where a float is expected. allow_inf_nan=False: inf and nan are refused in every float,
    including those with only a lower bound (temperature, learning rate)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------- backends
class TransformersBackend(Strict):
    """A local HF-format checkpoint run with transformers (batched, left-padded)."""

    kind: Literal["transformers"]
    model: str = catalog.BASE_MODEL.as_posix()  # directory with config.json + *.safetensors
    batch_size: PositiveInt = 8  # prompts per generate() call; each yields n samples
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # float32 on CPU
    trust_remote_code: bool = False  # only for checkpoints you trust: it runs their Python
    prefix_cache: bool = True  # encode the head shared by all prompts of a call once (the spec system prompt)
    prefix_cache_min_tokens: PositiveInt = 32  # shorter shared heads are not worth the cache copy
    # KV cache in buffers sized for the whole call; False = transformers' DynamicCache, which copies the whole cache
    # every decoding step (same outputs, slower: see bench_generation.py)
    reserved_kv: bool = True


class OpenAIBackend(Strict):
    """Any OpenAI-compatible /v1/chat/completions server (vLLM, llama.cpp server, a hosted API)."""

    kind: Literal["openai"]
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: Optional[EnvVarName] = None  # NAME of the env var holding the key; the key itself never goes in params
    concurrency: PositiveInt = 8  # requests in flight at once
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5  # per request, on 429/5xx/timeouts/garbled bodies
    timeout_s: Seconds = 60.0  # deadline of one HTTP attempt, from sending the request to the last byte of the reply
    backoff_s: NonNegSeconds = 0.5  # first retry delay; doubles each retry


class FakeBackend(Strict):
    """Deterministic scripted answers, for tests and smoke runs; needs no model."""

    kind: Literal["fake"]
    delay_s: NonNegSeconds = 0.0  # simulated latency per generate() call (smoke runs, kill tests)


Backend = Annotated[Union[TransformersBackend, OpenAIBackend, FakeBackend], Field(discriminator="kind")]


class Sampling(Strict):
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 0.8  # 0 = greedy
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    max_new_tokens: PositiveInt = 160
    seed: Seed = 0
    # > 1 discourages repeating tokens already in the text (HF `repetition_penalty`); small greedy models otherwise
    # loop ("E.1, E.2, E.3, ..."). 1.0 = off. HTTP backends send it only when != 1.0 (vLLM and llama.cpp servers
    # accept it; a hosted OpenAI endpoint does not).
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0


# ---------------------------------------------------------------------------- judge
class JudgeParams(Strict):
    """The spec-aware judge (G_RM). `rubric` is offline and deterministic; `llm` asks a backend."""

    kind: Literal["rubric", "llm"] = "rubric"
    backend: Optional[Backend] = None  # required for kind=llm
    sampling: Sampling = Sampling(temperature=0.7, max_new_tokens=96)
    k: Annotated[int, Field(gt=0, le=100)] = 3  # scores per sample; the minimum is kept (paper: conservative judge)
    threshold: Annotated[float, Field(ge=0.0, le=10.0)] = 7.0  # keep a sample when min score >= threshold
    sees_cot: bool = True  # filtering sees the CoT; RL reward and evaluation must not
    hard_refusal_max_words: PositiveInt = 60  # a hard refusal longer than this is not "brief"

    @model_validator(mode="after")
    def _llm_needs_backend(self) -> "JudgeParams":
        if self.kind == "llm" and self.backend is None:
            raise ValueError("kind 'llm' needs a 'backend' (transformers, openai or fake)")
        return self
