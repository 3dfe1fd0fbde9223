"""`DagsterDvcTranslator`: one `AssetSpec` per dvc.yaml stage, built from small overridable hooks.

Like dagster-dbt's translator: `get_asset_spec(manifest, stage)` calls `get_asset_key`, `get_group_name`,
`get_description`, `get_metadata`, `get_code_version`, `get_partitions_def`, `get_partition_mapping`, ... and stamps the
stage name into metadata (`dvc/stage`) so the runtime maps an asset key back to its DVC stage. Customise by
subclassing and calling `super()`:

    class MyTranslator(DagsterDvcTranslator):
        def get_group_name(self, stage):
            return "generation" if stage.name == "raw_cots" else super().get_group_name(stage)

A dvc.yaml stage may also carry overrides in its `meta:` block, read by the default hooks:
`meta: {dagster: {asset_key: [my, key], group: training, owners: [me@x.org]}}`.

Mapping: a plain stage is an unpartitioned asset; a foreach/matrix stage is one asset with a
`StaticPartitionsDefinition` over its keys (the categories from params.yaml, the models of eval_scores). Deps come from
matching outs to deps item by item; the item edges decide the partition mapping (same key -> identity, every key ->
all partitions, anything else -> a static mapping of exactly those edges).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import dagster as dg

from .checks import DvcCheck, checks_for
from .manifest import DvcManifest, DvcStage, StageItem
from .metadata import item_metadata
from .versions import code_version, default_is_code_dep

PHASES = ("spec", "data", "training", "evaluation")  # the default group names


def default_phase(stage_name: str) -> str:
    """spec_* -> spec; *_checkpoint / train* -> training; eval* / report* -> evaluation; anything else -> data."""
    if stage_name.startswith("spec"):
        return "spec"
    if stage_name.endswith("checkpoint") or stage_name.startswith("train"):
        return "training"
    if stage_name.startswith(("eval", "report")):
        return "evaluation"
    return "data"


class DagsterDvcTranslator:
    """Turns DVC stages into Dagster asset specs. Stateless apart from memo caches; safe to share."""

    def __init__(self) -> None:
        # (id(manifest), stage) -> (manifest, spec); keeping the manifest referenced keeps its id from being reused
        self._spec_cache: Dict[Tuple[int, str], Tuple[DvcManifest, dg.AssetSpec]] = {}
        self._partitions_cache: Dict[Tuple[str, ...], dg.StaticPartitionsDefinition] = {}

    # -------------------------------------------------------------------------------------------- the spec
    def get_asset_spec(self, manifest: DvcManifest, stage_name: str) -> dg.AssetSpec:
        memo = (id(manifest), stage_name)
        if memo in self._spec_cache:
            return self._spec_cache[memo][1]
        stage = manifest.stages[stage_name]
        deps: List[dg.AssetDep] = []
        for up in self.upstream_stages(manifest, stage_name):
            upstream = manifest.stages[up]
            deps.append(dg.AssetDep(self.get_asset_key(upstream),
                                    partition_mapping=self.get_partition_mapping(manifest, stage, upstream)))
        spec = dg.AssetSpec(
            key=self.get_asset_key(stage),
            deps=deps,
            description=self.get_description(stage),
            metadata={**self.get_metadata(manifest, stage), "dvc/stage": stage.name},
            group_name=self.get_group_name(stage),
            code_version=self.get_code_version(manifest, stage),
            owners=self.get_owners(stage),
            tags=self.get_tags(stage),
            kinds=self.get_kinds(stage),
            partitions_def=self.get_partitions_def(stage),
            automation_condition=self.get_automation_condition(stage),
        )
        self._spec_cache[memo] = (manifest, spec)
        return spec

    @staticmethod
    def upstream_stages(manifest: DvcManifest, stage_name: str) -> List[str]:
        ups = {u for (u, d) in manifest.stage_edges() if d == stage_name}
        return [s for s in manifest.stage_order() if s in ups]

    # -------------------------------------------------------------------------------------------- hooks
    def _dagster_meta(self, stage: DvcStage) -> Mapping[str, Any]:
        meta = stage.meta.get("dagster") if isinstance(stage.meta, Mapping) else None
        return meta if isinstance(meta, Mapping) else {}

    def get_asset_key(self, stage: DvcStage) -> dg.AssetKey:
        override = self._dagster_meta(stage).get("asset_key")
        if override:
            return dg.AssetKey(override if isinstance(override, list) else [override])
        return dg.AssetKey([stage.name])

    def get_group_name(self, stage: DvcStage) -> Optional[str]:
        return self._dagster_meta(stage).get("group") or default_phase(stage.name)

    def get_description(self, stage: DvcStage) -> str:
        head = stage.desc or f"DVC stage `{stage.name}`."
        if stage.is_template:
            head += f" One partition per foreach key ({len(stage.items)}): `dvc repro --single-item {stage.name}@<key>`."
        else:
            head += f" Materialized by `dvc repro --single-item {stage.name}`."
        outs = sorted({o.path for i in stage.items for o in i.outs})
        shown = ", ".join(f"`{o}`" for o in outs[:8]) + (" ..." if len(outs) > 8 else "")
        return f"{head}\n\n```\n{stage.template_cmd}\n```\n\nOuts: {shown}"

    def get_metadata(self, manifest: DvcManifest, stage: DvcStage) -> Dict[str, Any]:
        md: Dict[str, Any] = {
            "dvc/cmd": stage.template_cmd,
            "dvc/deps": dg.MetadataValue.json(list(stage.deps)),
            "dvc/outs": dg.MetadataValue.json(sorted({o.path for i in stage.items for o in i.outs})),
            "dvc/source_deps": dg.MetadataValue.json(list(manifest.source_deps(stage.name))),
        }
        if stage.params:
            md["dvc/params"] = dg.MetadataValue.json([f"{p.file}:{p.key or '*'}" for p in stage.params])
        if stage.is_template:
            md["dvc/foreach_keys"] = dg.MetadataValue.json(list(stage.keys or ()))
        return md

    def is_code_dep(self, root: Path, path: str) -> bool:
        return default_is_code_dep(root, path)

    def get_code_version(self, manifest: DvcManifest, stage: DvcStage) -> str:
        return code_version(manifest, stage, self.is_code_dep)

    def get_partitions_def(self, stage: DvcStage) -> Optional[dg.PartitionsDefinition]:
        if not stage.is_template:
            return None
        keys = tuple(stage.keys or ())
        if keys not in self._partitions_cache:
            self._partitions_cache[keys] = dg.StaticPartitionsDefinition(list(keys))
        return self._partitions_cache[keys]

    def get_partition_mapping(self, manifest: DvcManifest, stage: DvcStage,
                              upstream: DvcStage) -> Optional[dg.PartitionMapping]:
        if not upstream.is_template:
            return None  # an unpartitioned upstream feeds every partition
        pairs: Set[Tuple[Optional[str], Optional[str]]] = set(manifest.stage_edges().get((upstream.name, stage.name), []))
        up_keys = [u for u in (upstream.keys or ()) if any(p[0] == u for p in pairs)]
        if not stage.is_template:
            if set(up_keys) == set(upstream.keys or ()):
                return dg.AllPartitionMapping()
            return dg.SpecificPartitionsPartitionMapping(up_keys)
        down_keys = list(stage.keys or ())
        if pairs == {(k, k) for k in down_keys} and set(down_keys) <= set(upstream.keys or ()):
            return dg.IdentityPartitionMapping()
        if pairs == {(u, d) for u in (upstream.keys or ()) for d in down_keys}:
            return dg.AllPartitionMapping()
        by_up: Dict[str, Set[str]] = {}
        for u, d in pairs:
            by_up.setdefault(str(u), set()).add(str(d))
        return dg.StaticPartitionMapping(by_up)

    def get_kinds(self, stage: DvcStage) -> Set[str]:
        return {"dvc"}

    def get_tags(self, stage: DvcStage) -> Dict[str, str]:
        return {}

    def get_owners(self, stage: DvcStage) -> Optional[Sequence[str]]:
        owners = self._dagster_meta(stage).get("owners")
        return list(owners) if owners else None

    def get_automation_condition(self, stage: DvcStage) -> Optional[dg.AutomationCondition]:
        return None

    # -------------------------------------------------------------------------------------------- checks
    def get_checks(self, stage: DvcStage) -> List[DvcCheck]:
        """The plain-function checks of this stage (dagster_project.checks.CHECKS_BY_STAGE by default)."""
        return checks_for(stage.name)

    def get_check_specs(self, manifest: DvcManifest, stage_name: str) -> List[dg.AssetCheckSpec]:
        stage = manifest.stages[stage_name]
        key = self.get_asset_key(stage)
        specs = []
        with warnings.catch_warnings():
            # Partitioned asset checks are a preview feature in Dagster 1.13; each category gets its own result.
            warnings.simplefilter("ignore", dg.PreviewWarning)
            for check in self.get_checks(stage):
                specs.append(dg.AssetCheckSpec(check.name, asset=key, description=check.description,
                                               blocking=check.blocking, partitions_def=self.get_partitions_def(stage)))
        return specs

    # -------------------------------------------------------------------------------------------- run time
    def get_materialization_metadata(self, manifest: DvcManifest, item: StageItem, reused: bool) -> Dict[str, Any]:
        return item_metadata(manifest, item, reused)
