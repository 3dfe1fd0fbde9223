"""`evaluate`: score any checkpoint or OpenAI-compatible endpoint on any eval set, outside the DAG.

    python -m pipelines evaluate --model data/sft_checkpoint --eval data/evals/benign.jsonl
    python -m pipelines evaluate --model http://127.0.0.1:8000/v1 --eval xstest_prompts.csv --out xstest.json

--model: a directory with config.json + *.safetensors (run with transformers, using the batch size, device and dtype
of `eval_scores.generator` when that is a transformers backend), or an http(s) base URL of an OpenAI-compatible server
(served model name and API key env var from `eval_scores.endpoint`; with no name set, the first model the server lists
at GET <url>/models).
--eval: our JSONL (harmful.jsonl / benign.jsonl / jailbreak.jsonl: the kind is the file stem), an XSTest CSV or a
StrongREJECT CSV (see pipelines/eval_sets.py).

Prompting, scoring and metrics are exactly those of eval_scores (`eval_scores.evaluate_items`, `score_answers`,
`aggregate`); only the item source and the output place differ. Prints a summary; with --out, writes
{"model", "eval", "metrics", "results"} as JSON.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import httpx

from .backends import make_backend
from .errors import PipelineError
from .eval_scores import aggregate, format_summary, run_eval
from .eval_sets import load_eval_set
from .eval_tables import format_public_tables, strongreject_table, xstest_table
from .io import check_output_path, register_secret, write_json
from .judges import make_judge
from .params import Params
from .params.common import Backend, OpenAIBackend, TransformersBackend
from .params.evaluation import EvalScoresParams
from .spec import load_spec
from .timings import record

log = logging.getLogger("evaluate")


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def served_model(base_url: str, api_key_env: Optional[str], timeout_s: float) -> str:
    """The first model id a server lists at GET <base_url>/models; a one-line error when it cannot be had."""
    url = base_url.rstrip("/") + "/models"
    headers = {}
    if api_key_env:
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise PipelineError(f"eval_scores.endpoint.api_key_env: environment variable {api_key_env} is unset or empty")
        register_secret(key)  # a /models reply that echoes the key must not reach results.json as the model name
        headers["Authorization"] = f"Bearer {key}"
    hint = "set eval_scores.endpoint.model to the served model name"
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout_s)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except httpx.HTTPStatusError as e:
        raise PipelineError(f"{url}: HTTP {e.response.status_code} listing models; {hint}") from None
    except httpx.HTTPError as e:
        raise PipelineError(f"{url}: cannot list models ({type(e).__name__}); is the server up? or {hint}") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise PipelineError(f"{url}: the model list is not OpenAI-style JSON with data[0].id; {hint}") from None


def backend_for(target: str, cfg: EvalScoresParams) -> Backend:
    """Backend config for a checkpoint directory or an endpoint URL."""
    if is_url(target):
        ep = cfg.endpoint
        name = ep.model or served_model(target, ep.api_key_env, ep.timeout_s)
        return OpenAIBackend(kind="openai", base_url=target, model=name, api_key_env=ep.api_key_env,
                             concurrency=ep.concurrency, timeout_s=ep.timeout_s)
    path = Path(target)
    if not (path / "config.json").is_file():
        raise PipelineError(f"--model {target}: not a checkpoint directory (no config.json) and not an http(s) URL")
    base = cfg.generator if cfg.generator.kind == "transformers" else TransformersBackend(kind="transformers")
    return base.model_copy(update={"model": str(path)})


def main(params: Params, model: str, eval_path: Path, out: Optional[Path] = None) -> None:
    t0 = time.time()
    if out is not None:  # before any work: a bad --out must not waste an evaluation (the CLI checks it too)
        check_output_path(out, "--out")
    cfg = params.eval_scores
    items = load_eval_set(eval_path)
    spec = load_spec(params.paths.spec, params.categories)
    gen = backend_for(model, cfg)
    judge = make_judge(cfg.judge, spec)
    backend = make_backend(gen)
    try:
        rows = run_eval(items, backend, judge, spec, cfg, params.sft_dataset.system_prompt,
                        desc=f"evaluate {Path(eval_path).name}")
    finally:
        backend.close()
        judge.close()
    # the time goes to paths.work/timings/evaluate.json, not into the results: the same evaluation run twice writes
    # the same file, so two results files can be compared with diff
    metrics = {"model": model, "eval": str(eval_path), "generator": backend.name, "judge": judge.name,
               **aggregate(rows, cfg)}
    xs, sr = xstest_table(rows), strongreject_table(rows)
    metrics.update({k: v for k, v in (("xstest", xs), ("strongreject", sr)) if v})
    print(format_summary(metrics, f"evaluate {model} on {eval_path} (judge {judge.name})"))
    for line in format_public_tables(xs, sr):
        print(line)
    if out is not None:
        write_json(out, {"model": model, "eval": str(eval_path), "metrics": metrics, "results": rows})
        print(f"results: {out}")
    wall = record("evaluate", params.paths.work, wall_s=time.time() - t0)["wall_s"]
    log.info("evaluate: done in %.1f s", wall)
