"""`build_definitions(project_dir)`: everything Dagster needs for one DVC project, read from its dvc.yaml."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

import dagster as dg

from .assets import dvc_assets
from .inputs import input_assets
from .jobs import build_asset_jobs, build_full_pipeline_job
from .manifest import DvcManifest
from .resource import DVC_POOL, DvcCliResource
from .sensors import build_spec_sensor, build_sync_sensor
from .translator import DagsterDvcTranslator


# DAGSTER_EXECUTOR=<name> -> (module, attribute). The non-default ones need their package installed; their run config
# examples are in configs/dagster/run_<name>.yaml.
EXECUTORS = {
    "multiprocess": ("dagster", "multiprocess_executor"),
    "in_process": ("dagster", "in_process_executor"),
    "k8s": ("dagster_k8s", "k8s_job_executor"),
    "celery": ("dagster_celery", "celery_executor"),
    "celery_k8s": ("dagster_celery_k8s", "celery_k8s_job_executor"),
    "docker": ("dagster_docker", "docker_executor"),
}


def executor_from_env(default: str = "multiprocess") -> dg.ExecutorDefinition:
    """The executor named by $DAGSTER_EXECUTOR (default multiprocess): switching to k8s/celery/docker is config."""
    name = os.environ.get("DAGSTER_EXECUTOR", default).strip() or default
    if name not in EXECUTORS:
        raise ValueError(f"DAGSTER_EXECUTOR={name!r}: expected one of {', '.join(EXECUTORS)}")
    module, attr = EXECUTORS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise ImportError(f"DAGSTER_EXECUTOR={name} needs `pip install {module.replace('_', '-')}`") from None


def build_definitions(project_dir: str | Path, translator: Optional[DagsterDvcTranslator] = None,
                      spec_dir: str = "data/spec", executor: Optional[dg.ExecutorDefinition] = None,
                      manifest: Optional[DvcManifest] = None) -> dg.Definitions:
    """Assets (one multi-asset per partitions definition, plus the observable inputs), checks, jobs, the sync and spec
    sensors and the `dvc` resource.

    Args:
        project_dir: the DVC project root.
        translator: a `DagsterDvcTranslator` subclass instance to customise keys, groups, partitions, checks.
        spec_dir: the directory the spec sensor watches.
        executor: default: $DAGSTER_EXECUTOR, else multiprocess (steps in child processes; the `dvc` pool keeps DVC
            serial). Tests use `dagster.materialize`, which runs in process.
        manifest: the project's DvcManifest if the caller has loaded it already (`sync` shares one).
    """
    project_dir = Path(project_dir).resolve()
    translator = translator or DagsterDvcTranslator()
    manifest = manifest or DvcManifest.load(project_dir)
    sensor = build_spec_sensor(manifest, translator, watch=spec_dir)
    return dg.Definitions(
        assets=[*dvc_assets(manifest, translator=translator, pool=DVC_POOL), *input_assets(manifest, translator)],
        jobs=[build_full_pipeline_job(translator, pool=DVC_POOL), *build_asset_jobs(manifest, translator)],
        sensors=[build_sync_sensor(manifest, translator), *([sensor] if sensor is not None else [])],
        resources={"dvc": DvcCliResource(project_dir=str(project_dir))},
        executor=executor or executor_from_env(),
        metadata={"dvc/project_dir": str(project_dir)},
    )
