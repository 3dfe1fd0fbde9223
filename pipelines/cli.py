"""One CLI, one subcommand per DVC stage; dvc.yaml calls these. Each validates params.yaml before writing anything.

    python -m pipelines base_model
    python -m pipelines spec_chunks --category violence
    python -m pipelines raw_cots --category violence
    python -m pipelines judged_cots --category violence
    python -m pipelines sft_dataset
    python -m pipelines sft_checkpoint
    python -m pipelines rl_checkpoint
    python -m pipelines eval_scores --model sft
    python -m pipelines report
    python -m pipelines judge_calibration
    python -m pipelines refusal_classifier
    python -m pipelines harm_grader
    python -m pipelines evaluate --model PATH_OR_URL --eval PATH
    python -m pipelines cards [--model sft]
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import typer

from .errors import PipelineError
from .io import check_input_file

app = typer.Typer(
    help="Deliberative-alignment pipeline stages (normally run by `dvc repro`; see dvc.yaml).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params.yaml to validate and use.")
CategoryOpt = typer.Option(..., "--category", "-c", help="Category (one of params.yaml `categories`).")


def _run(stage: str, params_path: Path, checks: Sequence[Callable[[], object]] = (), **kwargs) -> None:
    """Validate params, run `checks` (paths given on the command line), log the params, then call
    `pipelines.<stage>.main(params, **kwargs)`. Bad input -> one line, exit 2, before any work or any write."""
    from .params import load_params

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        params = load_params(params_path)  # a missing, unreadable or directory --params is a one-line error too
        for check in checks:
            check()
        if "category" in kwargs and kwargs["category"] not in params.categories:
            raise PipelineError(
                f"--category {kwargs['category']!r} is not in {params_path}: categories ({', '.join(params.categories)})"
            )
        section = getattr(params, stage, None)
        if section is not None:
            logging.getLogger(stage).info("params.%s = %s", stage, section.model_dump_json())
        main: Callable = importlib.import_module(f"pipelines.{stage}").main
        main(params, **kwargs)
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


@app.command("base_model")
def base_model(params: Path = ParamsOpt) -> None:
    """Materialise the base checkpoint (safetensors + tokenizer) from the packaged GGUF or a local directory."""
    _run("base_model", params)


@app.command("spec_chunks")
def spec_chunks(category: str = CategoryOpt, params: Path = ParamsOpt) -> None:
    """spec(category) = overview + that category's policy + the style guidelines it uses."""
    _run("spec_chunks", params, category=category)


@app.command("raw_cots")
def raw_cots(category: str = CategoryOpt, params: Path = ParamsOpt) -> None:
    """Generate n (CoT, answer) samples per prompt, spec in context; resumable shards."""
    _run("raw_cots", params, category=category)


@app.command("judged_cots")
def judged_cots(category: str = CategoryOpt, params: Path = ParamsOpt) -> None:
    """Score every sample k times with the spec-aware judge; keep the minimum; flag kept samples."""
    _run("judged_cots", params, category=category)


@app.command("sft_dataset")
def sft_dataset(params: Path = ParamsOpt) -> None:
    """Merge kept samples of all categories into spec-free chat examples (prompt -> CoT + answer)."""
    _run("sft_dataset", params)


@app.command("sft_checkpoint")
def sft_checkpoint(params: Path = ParamsOpt) -> None:
    """Supervised fine-tuning (TRL SFTTrainer) of the base model on the SFT dataset."""
    _run("sft_checkpoint", params)


@app.command("rl_checkpoint")
def rl_checkpoint(params: Path = ParamsOpt) -> None:
    """RL (TRL GRPOTrainer) from the SFT model with the spec-aware judge as reward (the judge does not see the CoT)."""
    _run("rl_checkpoint", params)


@app.command("eval_scores")
def eval_scores(
    model: str = typer.Option(..., "--model", "-m", help="Which model to evaluate: base, sft or rl."),
    params: Path = ParamsOpt,
) -> None:
    """Evaluate one model: refusal, over-refusal, jailbreak goodness, style adherence."""
    _run("eval_scores", params, model=model)


@app.command("report")
def report(params: Path = ParamsOpt) -> None:
    """Compare base/SFT/RL: markdown + JSON tables and plots."""
    _run("report", params)


@app.command("judge_calibration")
def judge_calibration(params: Path = ParamsOpt) -> None:
    """Score every judge against the hand-labelled gold set: accuracy, precision/recall, Cohen's kappa, cost."""
    _run("judge_calibration", params)


@app.command("refusal_classifier")
def refusal_classifier(params: Path = ParamsOpt) -> None:
    """Train the three-class refusal classifier on the labelled voices (train/dev/test split by voice)."""
    _run("refusal_classifier", params)


@app.command("harm_grader")
def harm_grader(params: Path = ParamsOpt) -> None:
    """Train the offline StrongREJECT-style grader (convincing, specific) on the labelled rows, split by writer."""
    _run("harm_grader", params)


@app.command("cards")
def cards(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Write the model card of this eval_scores.models key (base, sft, rl) "
                                             "instead of the dataset cards."),
    params: Path = ParamsOpt,
) -> None:
    """Hugging Face dataset cards of every dataset in dvc.lock, or (--model) one model's card with its evaluation."""
    _run("cards", params, model=model)


@app.command("evaluate")
def evaluate(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint directory or an OpenAI-compatible base URL."),
    eval_path: Path = typer.Option(..., "--eval", "-e", help="Eval set: our JSONL, an XSTest CSV or a StrongREJECT CSV."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write results JSON (default: print)."),
    params: Path = ParamsOpt,
) -> None:
    """Evaluate any checkpoint or endpoint on any eval set, outside the DAG."""
    # Both paths are checked before the model is loaded (a bad --out used to fail after the whole evaluation):
    # --eval here, --out first thing in evaluate.main, which other callers use too.
    _run("evaluate", params, checks=[lambda: check_input_file(eval_path, "--eval")], model=model, eval_path=eval_path,
         out=out)


if __name__ == "__main__":  # pragma: no cover
    app()
