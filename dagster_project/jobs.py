"""Jobs: `data_only`, `evaluate` (asset jobs) and `full_pipeline` (one op that walks the whole dvc.yaml).

Why `full_pipeline` is an op job: Dagster requires all partitioned assets of an asset job to share one partitions
definition, and this DAG has two (categories for spec_chunks/raw_cots/judged_cots, models for eval_scores). So the full
run is one op (in the `dvc` pool) that runs `dvc repro --single-item` for every item upstream first, with each item's
checks in between (a failed blocking check stops it), and records every item as an `AssetMaterialization` of its
asset partition (with the dvc.lock data version and the code version) plus its `AssetCheckEvaluation`s, so the asset
catalog, staleness and `audit` see a full run exactly like per-asset runs. From the UI, "Materialize all" on the asset
graph (an asset backfill) is the per-asset alternative.
"""
# (no `from __future__ import annotations`: Dagster reads the op signatures' annotations at definition time)

from typing import Any, Dict, List, Sequence

import dagster as dg
from pydantic import Field

from .manifest import DvcManifest
from .resource import DVC_POOL, DvcCliResource, DvcReproInvocation
from .translator import DagsterDvcTranslator

# job name -> (description, stages it ends at (with everything upstream) | exact stages)
UPSTREAM_OF: Dict[str, Sequence[str]] = {"data_only": ["sft_dataset"]}
# evaluate also carries the two measurement models eval_scores reads (DVC skips them when they are up to date), so
# an evaluation launched on its own never finds them missing
EXACTLY: Dict[str, Sequence[str]] = {"evaluate": ["refusal_classifier", "harm_grader", "eval_scores", "report"]}
DESCRIPTIONS = {
    "data_only": "Spec chunks, CoT generation, judging and the SFT dataset (everything up to sft_dataset), "
                 "for one category partition; base_model and sft_dataset run too and are skipped by DVC when unchanged.",
    "evaluate": "Evaluate one model partition (eval_scores@<model>) and rebuild the report (the refusal classifier "
                "and harm grader it reads are brought up to date first).",
}


class FullPipelineConfig(dg.Config):
    items: List[str] = Field(default_factory=list,
                             description="dvc.yaml stages or items to run (upstream first); empty = the whole pipeline.")
    force: bool = Field(default=False, description="`dvc repro --force`: rerun even when DVC finds nothing changed.")


def build_full_pipeline_job(translator: DagsterDvcTranslator, pool: str = DVC_POOL) -> dg.JobDefinition:
    @dg.op(name="dvc_repro_all", pool=pool, description="dvc repro --single-item, item by item, for the whole DAG.")
    def dvc_repro_all(context: dg.OpExecutionContext, config: FullPipelineConfig, dvc: DvcCliResource) -> None:
        invocation = DvcReproInvocation.for_items(dvc, context, translator, config.items, config.force)
        for event in invocation.stream():
            context.log_event(event)

    @dg.job(name="full_pipeline", description="The whole dvc.yaml, item by item (see dagster_project/jobs.py).")
    def full_pipeline() -> None:
        dvc_repro_all()

    return full_pipeline


def build_asset_jobs(manifest: DvcManifest, translator: DagsterDvcTranslator) -> List[Any]:
    """`data_only` and `evaluate`, each only when its stages exist in dvc.yaml (so a partial DAG still loads)."""
    key = {name: translator.get_asset_key(stage) for name, stage in manifest.stages.items()}
    jobs = []
    for name, ends in UPSTREAM_OF.items():
        present = [key[s] for s in ends if s in key]
        if present:
            jobs.append(dg.define_asset_job(name, dg.AssetSelection.assets(*present).upstream(),
                                            description=DESCRIPTIONS.get(name)))
    for name, stages in EXACTLY.items():
        present = [key[s] for s in stages if s in key]
        if present:
            jobs.append(dg.define_asset_job(name, dg.AssetSelection.assets(*present), description=DESCRIPTIONS.get(name)))
    return jobs

