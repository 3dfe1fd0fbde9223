"""`DvcCliResource`: runs `dvc` for Dagster, like dagster-dbt's `DbtCliResource`.

    @multi_asset(specs=..., can_subset=True, pool="dvc")
    def my_assets(context: AssetExecutionContext, dvc: DvcCliResource):
        yield from dvc.repro(context).stream()

`repro(context)` turns the selected asset keys (+ the run's partition key) into DVC items (`raw_cots@violence`), and
`stream()` runs `dvc repro --single-item <item>` for each, upstream first (items that one `dvc status` taken
before anything ran reports up to date are reused without starting DVC again), echoing DVC's output into the Dagster log
line by line. After each item it yields a `MaterializeResult` whose data version is the out md5 now in dvc.lock, with
metadata from the outs (and whether DVC reused the result), then the item's asset check results (a costly check that
passed on the same dvc.lock record is not run again: checks.OutcomeCache). A failed blocking
check stops the step before any later item runs. A non-zero exit raises with DVC's error; an interrupt reaches DVC as
SIGINT (see dvc_cli.py).

Stages marked `meta: {dagster: {pipes: true}}` in dvc.yaml (the training stages) report through Dagster Pipes: their
`dvc repro` runs inside a pipes session whose bootstrap variables go into DVC's environment, which DVC hands to the
stage command. What the stage logs through pipes (a line per training step) arrives in the run log while it runs;
custom messages `{"metadata": {...}}` it sends are added to the item's materialization metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set

import dagster as dg
from pydantic import Field

from .checks import CheckOutcome, DvcCheck, OutcomeCache, run_check
from .dvc_cli import DvcRun, dvc_json, is_progress_frame, run_dvc, status_in_process
from .manifest import DvcManifest, StageItem
from .translator import DagsterDvcTranslator
from .versions import data_version

DVC_POOL = "dvc"  # the concurrency pool every DVC-running op joins; limit it to 1 (configs/dagster/dagster.yaml)
# Tags Dagster itself reads on asset materializations (dagster._core.definitions.data_version).
DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"


def reports_through_pipes(item: StageItem) -> bool:
    """Whether the item's stage talks Dagster Pipes (dvc.yaml `meta: {dagster: {pipes: true}}`)."""
    dagster_meta = item.meta.get("dagster") if isinstance(item.meta, Mapping) else None
    return isinstance(dagster_meta, Mapping) and dagster_meta.get("pipes") is True


def pipes_metadata(messages: Sequence[Any]) -> Dict[str, Any]:
    """Materialization metadata from a stage's pipes custom messages: the `metadata` mapping of each, later wins."""
    out: Dict[str, Any] = {}
    for msg in messages:
        if isinstance(msg, Mapping) and isinstance(msg.get("metadata"), Mapping):
            for k, v in msg["metadata"].items():
                out[str(k)] = dg.MetadataValue.json(v) if isinstance(v, (Mapping, list)) else v
    return out


class DvcCliResource(dg.ConfigurableResource):
    """Runs the DVC CLI in a project directory, streaming its output to the Dagster log."""

    project_dir: str = Field(description="DVC project root (holds dvc.yaml, dvc.lock, params.yaml).")
    executable: Optional[str] = Field(
        default=None, description="`dvc` executable; default: `python -m dvc` with the interpreter running Dagster.")
    wait_for_lock: bool = Field(
        default=True, description="Pass DVC's global --wait-for-lock, so a second DVC process waits for the repo "
                                  "lock instead of failing (the pool of 1 should already prevent that).")
    env: Dict[str, str] = Field(default_factory=dict, description="Extra environment for DVC and stage commands.")
    cache_checks: bool = Field(
        default=True, description="Reuse the pass of a costly check (checkpoint loads and generates) while the item's "
                                  "dvc.lock record is the one it passed on (.dvc/tmp/dagster_check_outcomes.json).")

    def cli(self, args: Sequence[str], *, context: Optional[Any] = None, check: bool = True,
            env: Optional[Mapping[str, str]] = None) -> DvcRun:
        """Run `dvc args...`; each output line goes to the run's log (tqdm frames at debug level). `env` adds to
        the resource's own `env` for this call."""
        log = context.log if context is not None else dg.get_dagster_logger()

        def echo(line: str) -> None:
            if not line.strip():
                return
            (log.debug if is_progress_frame(line) else log.info)(line)

        return run_dvc(args, self.project_dir, echo, executable=self.executable, wait_for_lock=self.wait_for_lock,
                       env={**self.env, **(env or {})}, check=check)

    def manifest(self) -> DvcManifest:
        return DvcManifest.load(self.project_dir)

    def repro(self, context: dg.AssetExecutionContext, *, translator: Optional[DagsterDvcTranslator] = None,
              force: bool = False) -> "DvcReproInvocation":
        """Plan the DVC items for this step's selection; nothing runs until `.stream()` is iterated."""
        return DvcReproInvocation.from_asset_context(self, context, translator or DagsterDvcTranslator(), force)


# ------------------------------------------------------------------------------------------------ execution
@dataclass
class ItemPlan:
    item: StageItem
    asset_key: dg.AssetKey
    materialize: bool  # run `dvc repro` for it (False: only its checks were selected)
    checks: List[DvcCheck] = field(default_factory=list)


@dataclass
class DvcReproInvocation:
    resource: DvcCliResource
    context: Any
    translator: DagsterDvcTranslator
    plans: List[ItemPlan]
    manifest: DvcManifest
    force: bool = False
    as_asset_events: bool = True  # False: an op outside assets logs AssetMaterialization/AssetCheckEvaluation events
    code_versions: Dict[dg.AssetKey, str] = field(default_factory=dict)
    reported: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # item -> metadata its stage sent through pipes

    @classmethod
    def from_asset_context(cls, resource: DvcCliResource, context: dg.AssetExecutionContext,
                           translator: DagsterDvcTranslator, force: bool) -> "DvcReproInvocation":
        manifest = resource.manifest()
        specs = {spec.key: spec for spec in context.assets_def.specs}
        stage_of = {key: str(spec.metadata["dvc/stage"]) for key, spec in specs.items()}
        selected: Set[dg.AssetKey] = set(context.selected_asset_keys)
        selected_checks: Set[dg.AssetCheckKey] = set(context.selected_asset_check_keys)
        partition: Optional[str] = None
        if context.has_partition_key:
            keys = context.partition_keys
            if len(keys) != 1:
                raise dg.Failure(f"DVC assets materialize one partition per run, got a range of {len(keys)}; "
                                 "launch a backfill with one run per partition (the default backfill policy).")
            partition = keys[0]
        wanted: Dict[str, dg.AssetKey] = {}
        for key in set(selected) | {c.asset_key for c in selected_checks}:
            stage = manifest.stages.get(stage_of.get(key, ""))
            if stage is None:
                raise dg.Failure(f"asset {key.to_user_string()}: stage {stage_of.get(key)!r} is no longer in dvc.yaml "
                                 "(reload the code location)")
            try:
                item = stage.item(partition if stage.is_template else None)
            except KeyError:
                raise dg.Failure(f"{stage.name}: no foreach key {partition!r} in dvc.yaml/params.yaml "
                                 f"(keys: {', '.join(stage.keys or ())}); reload the code location") from None
            wanted[item.name] = key
        plans = []
        for name in manifest.topological_order():
            if name not in wanted:
                continue
            item, key = manifest.items[name], wanted[name]
            checks = [c for c in translator.get_checks(manifest.stages[item.stage])
                      if dg.AssetCheckKey(key, c.name) in selected_checks]
            plans.append(ItemPlan(item, key, key in selected, checks))
        return cls(resource, context, translator, plans, manifest, force,
                   code_versions={k: s.code_version for k, s in specs.items() if s.code_version})

    @classmethod
    def for_items(cls, resource: DvcCliResource, context: Any, translator: DagsterDvcTranslator,
                  items: Optional[Sequence[str]] = None, force: bool = False) -> "DvcReproInvocation":
        """Every item (or the named items / stages), upstream first, with all their checks, reported as asset events
        from a plain op (the `full_pipeline` job)."""
        manifest = resource.manifest()
        names = manifest.topological_order()
        if items:
            unknown = [n for n in items if n not in manifest.items and n not in manifest.stages]
            if unknown:
                raise dg.Failure(f"not a dvc.yaml stage or item: {', '.join(unknown)}")
            names = [n for n in names if n in items or manifest.items[n].stage in items]
        plans, code_versions = [], {}
        for name in names:
            stage = manifest.stages[manifest.items[name].stage]
            key = translator.get_asset_key(stage)
            code_versions[key] = translator.get_code_version(manifest, stage)
            plans.append(ItemPlan(manifest.items[name], key, True, translator.get_checks(stage)))
        return cls(resource, context, translator, plans, manifest, force, as_asset_events=False,
                   code_versions=code_versions)

    def stale_items(self) -> Optional[Set[str]]:
        """Items `dvc status` reports as changed, from ONE call for the whole plan; None when not worth asking.

        Each `dvc repro --single-item` starts DVC anew (~1 s), so a plan of many up-to-date items (a no-op "run
        everything") would cost a DVC start per item. One status call tells which items need `dvc repro` at all.
        """
        to_run = [p for p in self.plans if p.materialize]
        # a pipes stage is worth the question even alone: a pipes session for an item DVC then skips hears nothing
        # and Dagster warns about it
        if self.force or (len(to_run) < 2 and not any(reports_through_pipes(p.item) for p in to_run)):
            return None
        # the DVC this process imported answers without a new process, unless a specific executable is configured
        status = status_in_process(self.resource.project_dir) if self.resource.executable is None else None
        if status is None:
            status = dvc_json(["status"], self.resource.project_dir, executable=self.resource.executable,
                              env=self.resource.env)
        return set((status or {}).keys()) if isinstance(status, dict) else None

    def stream(self) -> Iterator[Any]:
        """Run each planned item (upstream first) and yield its events; see the module docstring."""
        stale = self.stale_items()
        cache = OutcomeCache(self.manifest.root) if self.resource.cache_checks else None  # read once a run
        ran_any = False
        for plan in self.plans:
            reused = False
            if plan.materialize and stale is not None and not ran_any and plan.item.name not in stale:
                # Up to date per the status taken before anything ran. Once an item has run, its downstream may
                # have become stale, so from then on every item goes through `dvc repro` again.
                reused = True
                self.context.log.info(f"{plan.item.name}: up to date per `dvc status`; dvc repro not needed")
            elif plan.materialize:
                run = self._repro(plan.item)
                reused = plan.item.name in run.reused and plan.item.name not in run.ran
                ran_any = ran_any or not reused
            manifest = self.manifest = self.manifest.with_fresh_lock()  # dvc.lock as the run left it
            item = manifest.items[plan.item.name]
            if plan.materialize:
                dv = data_version(manifest, item.name)
                if dv is None:
                    raise dg.Failure(f"{item.name}: dvc.lock records no md5 for its outs after `dvc repro`")
                metadata = self.translator.get_materialization_metadata(manifest, item, reused)
                metadata.update(self.reported.pop(item.name, {}))
                self.context.log.info(f"{item.name}: {'reused by DVC' if reused else 'ran'}; data version {dv}")
                yield self._materialization(plan, item, dv, metadata)
            failed_blocking: List[str] = []
            # Only after DVC vouched for the item in this run (status or repro) may a cached pass stand for it;
            # a check-only selection looks at the files as they are.
            use_cache = cache is not None and plan.materialize
            for check in plan.checks:
                outcome = cache.run(check, manifest, item) if use_cache else run_check(check, manifest, item)
                yield self._check_event(plan, item, check, outcome)
                if check.blocking and not outcome.passed:
                    failed_blocking.append(f"{check.name}: {outcome.description}")
            if failed_blocking:
                raise dg.Failure(f"{item.name}: blocking check failed, downstream items not run: "
                                 + "; ".join(failed_blocking))

    def _repro(self, item: StageItem) -> DvcRun:
        """`dvc repro --single-item <item>`; for a pipes stage, inside a pipes session (see the module docstring)."""
        args = ["repro", "--single-item", *(["--force"] if self.force else []), item.name]
        if not reports_through_pipes(item):
            return self.resource.cli(args, context=self.context)
        with dg.open_pipes_session(context=self.context, context_injector=dg.PipesTempFileContextInjector(),
                                   message_reader=dg.PipesTempFileMessageReader()) as session:
            run = self.resource.cli(args, context=self.context, env=session.get_bootstrap_env_vars())
        self.reported[item.name] = pipes_metadata(session.get_custom_messages())
        return run

    # -------------------------------------------------------------------------------------------- events
    def _materialization(self, plan: ItemPlan, item: StageItem, dv: str, metadata: Dict[str, Any]) -> Any:
        if self.as_asset_events:
            return dg.MaterializeResult(asset_key=plan.asset_key, data_version=dg.DataVersion(dv), metadata=metadata)
        tags = {DATA_VERSION_TAG: dv, USER_PROVIDED_TAG: "true"}
        if plan.asset_key in self.code_versions:
            tags[CODE_VERSION_TAG] = self.code_versions[plan.asset_key]
        return dg.AssetMaterialization(asset_key=plan.asset_key, partition=item.key, metadata=metadata, tags=tags)

    def _check_event(self, plan: ItemPlan, item: StageItem, check: DvcCheck, outcome: CheckOutcome) -> Any:
        severity = dg.AssetCheckSeverity.ERROR
        if self.as_asset_events:
            return dg.AssetCheckResult(asset_key=plan.asset_key, check_name=check.name, passed=outcome.passed,
                                       metadata=dict(outcome.metadata), description=outcome.description,
                                       severity=severity)
        return dg.AssetCheckEvaluation(asset_key=plan.asset_key, check_name=check.name, passed=outcome.passed,
                                       metadata=dict(outcome.metadata), description=outcome.description,
                                       severity=severity, blocking=check.blocking, partition=item.key)
