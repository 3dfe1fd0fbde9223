"""Every configs/dagster/run_<executor>.yaml is validated by its own executor, and a typo in any key fails.

Dagster's `validate_run_config` checks a run config against the job's executor schema, but the distributed executors
pass whole sections through untyped: Celery's `config_source` (Celery settings), the raw Kubernetes dicts of
dagster-k8s (`container_config`, `pod_spec_config`, `volumes`, ...) and docker-py's `container_kwargs`. A typo there
passes Dagster's schema and only surfaces on the cluster (a setting silently ignored, a pod or container refused). So
each config is also pushed through what the executor does with those sections when it launches a step, offline:
Celery's table of setting names, dagster-k8s's own Job construction (the Kubernetes models reject unknown fields), and
docker-py's translation of `containers.create` kwargs (unknown kwargs raise).

Needs the `scale` extra (`pip install -e ".[scale]"`: dagster-celery, dagster-k8s, dagster-docker). Without it the
tests FAIL with that instruction instead of skipping: a skipped test would let a broken config through CI.
"""
from __future__ import annotations

import copy
import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import dagster as dg
import pytest
import yaml

from dagster_project.build import EXECUTORS, build_definitions

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs/dagster"
RUN_CONFIGS = sorted(CONFIG_DIR.glob("run_*.yaml"))
EXPECTED = {"multiprocess", "celery", "k8s", "docker"}  # the executors the README promises
# Keys that are names chosen by the user, not fields of a schema: Kubernetes resource names (`cpu`,
# `nvidia.com/gpu`) and node label keys. Any spelling is legal there, so a "typo" cannot be caught offline.
FREE_FORM_PARENTS = {"requests", "limits", "node_selector"}
# The fields docker.types.DeviceRequest.__init__ reads (snake_case or the API's spelling).
DEVICE_REQUEST_KEYS = {"driver", "count", "device_ids", "capabilities", "options",
                       "Driver", "Count", "DeviceIDs", "Capabilities", "Options"}

Path_ = Tuple[Any, ...]


def executor_name(path: Path) -> str:
    return path.stem[len("run_"):]


def load_executor(name: str) -> dg.ExecutorDefinition:
    """The executor DAGSTER_EXECUTOR=<name> selects (dagster_project.build.EXECUTORS: the same mapping)."""
    module, attr = EXECUTORS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:  # fail, not skip: see the module docstring
        pytest.fail(f"{module} is not installed ({e}); install the `scale` extra: pip install -e '.[scale]'")


@lru_cache(maxsize=None)
def jobs_for(name: str) -> Tuple[dg.JobDefinition, ...]:
    """Every job of the real project's definitions, built with that executor (as DAGSTER_EXECUTOR=<name> would)."""
    defs = build_definitions(ROOT, executor=load_executor(name))
    return tuple(defs.resolve_job_def(j.name) for j in defs.resolve_all_job_defs())


def op_names(name: str) -> set:
    return {node.name for job in jobs_for(name) for node in job.graph.nodes}


# ------------------------------------------------------------------------------------------------ executor checks
def check_celery(cfg: Dict[str, Any]) -> None:
    """`config_source` goes to `Celery(config_source=...)`, which ignores names it does not know."""
    from celery.app.defaults import SETTING_KEYS

    unknown = sorted(set(cfg.get("config_source") or {}) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"config_source: not a Celery setting: {', '.join(unknown)}")


def check_k8s(cfg: Dict[str, Any], ops: set) -> None:
    """Build the Kubernetes Job of a step for every op the way K8sStepHandler does (executor-level context merged with
    the op's per_step_k8s_config), without a cluster: the k8s models raise on any unknown field."""
    import kubernetes
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    stray = sorted(set(cfg.get("per_step_k8s_config") or {}) - ops)
    if stray:  # dagster-k8s looks the op name up and silently applies nothing to a name that does not exist
        raise ValueError(f"per_step_k8s_config: no op named {', '.join(stray)} (ops: {', '.join(sorted(ops))})")
    # the same keyword arguments as dagster_k8s.executor.k8s_job_executor
    base = K8sContainerContext(
        image_pull_policy=cfg.get("image_pull_policy"), image_pull_secrets=cfg.get("image_pull_secrets"),
        service_account_name=cfg.get("service_account_name"), env_config_maps=cfg.get("env_config_maps"),
        env_secrets=cfg.get("env_secrets"), env_vars=cfg.get("env_vars"), volume_mounts=cfg.get("volume_mounts"),
        volumes=cfg.get("volumes"), labels=cfg.get("labels"), namespace=cfg.get("job_namespace"),
        resources=cfg.get("resources"), scheduler_name=cfg.get("scheduler_name"),
        security_context=cfg.get("security_context"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(cfg.get("step_k8s_config", {})))
    api = kubernetes.client.ApiClient()
    for op in sorted(ops):
        ctx = base.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            (cfg.get("per_step_k8s_config") or {}).get(op, {}))))
        job = construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image=cfg.get("job_image") or "image", dagster_home="/opt/dagster/dagster_home"),
            args=["dagster", "api", "execute_step"], job_name=f"dagster-step-{op.replace('_', '-')}",
            user_defined_k8s_config=ctx.run_k8s_config)
        api.sanitize_for_serialization(job)


def check_docker(cfg: Dict[str, Any]) -> None:
    """What DockerStepHandler passes to docker-py's `containers.create`, translated by docker-py itself (the step
    before the API call): an unknown kwarg or device-request field raises."""
    from docker.models.containers import _create_container_args
    from dagster_docker.utils import validate_docker_config

    kwargs = dict(cfg.get("container_kwargs") or {})
    validate_docker_config(cfg.get("network"), cfg.get("networks"), kwargs)
    for req in kwargs.get("device_requests") or []:
        # docker-py's DeviceRequest reads these keys and silently drops any other, so `cuont: -1` would
        # mean "no GPU" without an error anywhere
        unknown = sorted(set(req) - DEVICE_REQUEST_KEYS) if isinstance(req, dict) else []
        if unknown:
            raise TypeError(f"container_kwargs.device_requests: unknown field(s) {', '.join(unknown)}")
    kwargs.pop("stop_timeout", None)  # dagster-docker pops it before create()
    _create_container_args({"image": cfg.get("image") or "image", "command": ["dagster", "api", "execute_step"],
                            "name": "check", "detach": True, "network": cfg.get("network"),
                            "environment": {"DAGSTER_RUN_STEP_KEY": "check"}, "version": "1.44", **kwargs})


def validate(name: str, run_config: Dict[str, Any]) -> None:
    """Raise if `run_config` is not valid for executor `name` on every job of the project."""
    for job in jobs_for(name):
        dg.validate_run_config(job, run_config)  # DagsterInvalidConfigError names the bad key
    cfg = (run_config.get("execution") or {}).get("config") or {}
    if name == "celery":
        check_celery(cfg)
    elif name == "k8s":
        check_k8s(cfg, op_names(name))
    elif name == "docker":
        check_docker(cfg)


def key_paths(node: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every mapping key of a YAML document, as a path (list indices included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from key_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from key_paths(v, prefix + (i,))


def with_typo(doc: Dict[str, Any], path: Path_) -> Dict[str, Any]:
    """A copy of `doc` where the key at `path` is misspelt (two letters swapped, or a letter doubled)."""
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = str(path[-1])
    typo = key[:1] + key[2:3] + key[1:2] + key[3:] if len(key) > 2 and key[1] != key[2] else key + key[-1]
    parent[typo] = parent.pop(path[-1])
    return doc


# ------------------------------------------------------------------------------------------------ tests
def test_every_promised_executor_has_a_run_config():
    names = {executor_name(p) for p in RUN_CONFIGS}
    assert names >= EXPECTED, f"missing configs/dagster/run_<executor>.yaml: {sorted(EXPECTED - names)}"
    assert names <= set(EXECUTORS), f"run config for an executor DAGSTER_EXECUTOR cannot select: {names - set(EXECUTORS)}"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=executor_name)
def test_run_config_is_valid_for_its_executor(path):
    name = executor_name(path)
    jobs = jobs_for(name)
    assert {j.name for j in jobs} >= {"data_only", "evaluate", "full_pipeline"}
    assert all(j.executor_def.name == load_executor(name).name for j in jobs)
    validate(name, yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=executor_name)
def test_a_typo_in_any_key_fails_validation(path):
    name = executor_name(path)
    doc = yaml.safe_load(path.read_text())
    checked: List[str] = []
    missed: List[str] = []
    for p in key_paths(doc):
        if len(p) > 1 and p[-2] in FREE_FORM_PARENTS:
            continue
        label = ".".join(map(str, p))
        try:
            validate(name, with_typo(doc, p))
        except Exception:  # noqa: BLE001 - Dagster's config error, a k8s model error, docker-py's TypeError, ...
            checked.append(label)
        else:
            missed.append(label)
    assert not missed, f"{path.name}: a misspelt key passes validation: {missed}"
    assert checked, f"{path.name}: no key was checked"


def test_typo_in_an_executor_pass_through_section_is_caught():
    """The sections Dagster's schema does not type, one representative each (the cases validate() exists for)."""
    celery = yaml.safe_load((CONFIG_DIR / "run_celery.yaml").read_text())
    celery["execution"]["config"]["config_source"]["task_acks_lat"] = True
    with pytest.raises(ValueError, match="task_acks_lat"):
        validate("celery", celery)
    k8s = yaml.safe_load((CONFIG_DIR / "run_k8s.yaml").read_text())
    k8s["execution"]["config"]["step_k8s_config"]["container_config"]["resource"] = {}
    with pytest.raises(Exception, match="resource"):
        validate("k8s", k8s)
    k8s = yaml.safe_load((CONFIG_DIR / "run_k8s.yaml").read_text())
    k8s["execution"]["config"]["per_step_k8s_config"]["dvc_stage"] = {}
    with pytest.raises(ValueError, match="no op named dvc_stage"):
        validate("k8s", k8s)
    docker = yaml.safe_load((CONFIG_DIR / "run_docker.yaml").read_text())
    docker["execution"]["config"]["container_kwargs"]["volume"] = []
    with pytest.raises(TypeError, match="volume"):
        validate("docker", docker)
