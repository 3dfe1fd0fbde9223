"""Dagster over dvc.yaml: the DVC pipeline as partitioned assets, checks, jobs and a sensor, mirroring dagster-dbt.

    DvcManifest.load(root)          dvc.yaml (foreach expanded by DVC), dvc.lock, params.yaml as stage nodes
    DagsterDvcTranslator            one AssetSpec per stage through overridable hooks
    dvc_assets(manifest, ...)       one multi-asset per partitions definition, can_subset, pool "dvc"
    DvcCliResource                  `dvc repro --single-item` with streamed logs -> MaterializeResult + check results
    build_definitions(root)         assets + checks + jobs + sensor + resource; `definitions.defs` is this for the repo
    python -m dagster_project plan | audit
"""
from .assets import dvc_assets
from .build import build_definitions, executor_from_env
from .checks import CHECKS_BY_STAGE, CheckOutcome, DvcCheck
from .manifest import DvcManifest, DvcStage, ManifestError, StageItem
from .resource import DVC_POOL, DvcCliResource, DvcReproInvocation
from .translator import DagsterDvcTranslator

__all__ = [
    "CHECKS_BY_STAGE", "CheckOutcome", "DVC_POOL", "DagsterDvcTranslator", "DvcCheck", "DvcCliResource",
    "DvcManifest", "DvcReproInvocation", "DvcStage", "ManifestError", "StageItem", "build_definitions",
    "dvc_assets", "executor_from_env",
]
