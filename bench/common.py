"""Shared bits of the benchmarks: timing, a summary line, the generation conversations the pipeline really sends."""
from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # params.yaml paths are relative to the project root, as for dvc.yaml stages
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@contextmanager
def timer(out: dict, key: str):
    t = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(name: str, text: str) -> None:
    """The one-line result each benchmark ends with (bench/README.md copies these)."""
    print(f"SUMMARY {name}: {text}", flush=True)


def machine() -> str:
    return f"{os.cpu_count()} CPU cores, python {sys.version.split()[0]}"


def pipeline_conversations(category: str = "violence", k: int = 16):
    """The raw_cots conversations for the first k prompts of a category (spec chunk in the system prompt)."""
    from pipelines.params import load_params
    from pipelines.prompts import load_prompts
    from pipelines.raw_cots import generation_conversation, prefill_for
    from pipelines.spec import load_spec

    params = load_params(ROOT / "params.yaml")
    spec = load_spec(ROOT / params.paths.spec, params.categories)
    prompts = load_prompts(ROOT / params.paths.prompts / f"{category}.jsonl", spec, category)[:k]
    chunk = spec.chunk(category)
    convs = [generation_conversation(chunk, spec, category, r.prompt, params.raw_cots.few_shot) for r in prompts]
    return params, convs, prefill_for(spec, category)


def dagster_noop(repo: Path) -> tuple[float, int, int, int]:
    """Run the `full_pipeline` job once in-process on an up-to-date repo; (seconds, items materialized, checks
    evaluated, checks answered from the outcome cache). Definitions are built before the clock starts: a running
    webserver/daemon has them loaded already."""
    import dagster as dg

    from dagster_project.build import build_definitions

    os.environ["PYTHONPATH"] = str(repo)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    job = build_definitions(repo).resolve_job_def("full_pipeline")
    with dg.DagsterInstance.ephemeral() as instance:
        t = time.perf_counter()
        result = job.execute_in_process(instance=instance,  # the run log stays in the instance, not on the screen
                                        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        dt = time.perf_counter() - t
    if not result.success:
        raise SystemExit("Dagster full_pipeline failed")
    checks = result.get_asset_check_evaluations()
    cached = sum(1 for c in checks if "cached" in c.metadata)
    return dt, len(result.get_asset_materialization_events()), len(checks), cached
