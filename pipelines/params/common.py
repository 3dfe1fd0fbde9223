"""Building blocks shared by every params.yaml section: strict models, backends, sampling, judges.

Every model forbids unknown keys, so a typo in params.yaml is an error naming the key, never a silent default.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Strict(BaseModel):
    """Base for every params section: unknown keys are errors and values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- backends
class TransformersBackend(Strict):
    """A local HF-format checkpoint run with transformers (batched, left-padded)."""

    kind: Literal["transformers"]
    model: str = "data/base_model"  # directory with config.json + *.safetensors
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
    api_key_env: Optional[str] = None  # NAME of the env var holding the key; the key itself never goes in params
    concurrency: PositiveInt = 8  # requests in flight at once
    max_retries: NonNegInt = 5  # per request, on 429/5xx/timeouts/garbled bodies
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    backoff_s: Annotated[float, Field(ge=0)] = 0.5  # first retry delay; doubles each retry


class FakeBackend(Strict):
    """Deterministic scripted answers, for tests and smoke runs; needs no model."""

    kind: Literal["fake"]
    delay_s: Annotated[float, Field(ge=0)] = 0.0  # simulated latency per generate() call (smoke runs, kill tests)


Backend = Annotated[Union[TransformersBackend, OpenAIBackend, FakeBackend], Field(discriminator="kind")]


class Sampling(Strict):
    temperature: Annotated[float, Field(ge=0.0)] = 0.8  # 0 = greedy
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    max_new_tokens: PositiveInt = 160
    seed: int = 0
    # > 1 discourages repeating tokens already in the text (HF `repetition_penalty`); small greedy models otherwise
    # loop ("E.1, E.2, E.3, ..."). 1.0 = off. HTTP backends send it only when != 1.0 (vLLM and llama.cpp servers
    # accept it; a hosted OpenAI endpoint does not).
    repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0


# ---------------------------------------------------------------------------- judge
class JudgeParams(Strict):
    """The spec-aware judge (G_RM). `rubric` is offline and deterministic; `llm` asks a backend."""

    kind: Literal["rubric", "llm"] = "rubric"
    backend: Optional[Backend] = None  # required for kind=llm
    sampling: Sampling = Sampling(temperature=0.7, max_new_tokens=96)
    k: PositiveInt = 3  # scores per sample; the minimum is kept (paper: conservative judge)
    threshold: Annotated[float, Field(ge=0.0, le=10.0)] = 7.0  # keep a sample when min score >= threshold
    sees_cot: bool = True  # filtering sees the CoT; RL reward and evaluation must not
    hard_refusal_max_words: PositiveInt = 60  # a hard refusal longer than this is not "brief"

    @model_validator(mode="after")
    def _llm_needs_backend(self) -> "JudgeParams":
        if self.kind == "llm" and self.backend is None:
            raise ValueError("kind 'llm' needs a 'backend' (transformers, openai or fake)")
        return self
