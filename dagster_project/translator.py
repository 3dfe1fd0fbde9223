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

Inputs: the files users edit (deps no stage produces, not code) are observable assets of their own (inputs.py;
`get_input_asset_key`, `get_input_spec`), wired as deps of the stages that read them with the same mapping rule.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import dagster as dg

from .checks import DvcCheck, checks_for
from .inputs import InputCatalog, InputSource, discover_inputs
from .manifest import DvcManifest, DvcStage, StageItem
from .metadata import code_references, item_metadata
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


def partition_mapping(pairs: Set[Tuple[Optional[str], Optional[str]]], up_keys: Optional[Sequence[str]],
                      down_keys: Optional[Sequence[str]]) -> Optional[dg.PartitionMapping]:
    """The mapping that gives exactly the item edges `pairs` ((upstream key, downstream key)) between two assets with
    these partition keys (None = unpartitioned)."""
    if up_keys is None:
        return None  # an unpartitioned upstream feeds every partition
    used = [u for u in up_keys if any(p[0] == u for p in pairs)]
    if down_keys is None:
        return dg.AllPartitionMapping() if set(used) == set(up_keys) else dg.SpecificPartitionsPartitionMapping(used)
    if pairs == {(k, k) for k in down_keys} and set(down_keys) <= set(up_keys):
        return dg.IdentityPartitionMapping()
    if pairs == {(u, d) for u in up_keys for d in down_keys}:
        return dg.AllPartitionMapping()
    by_up: Dict[str, Set[str]] = {}
    for u, d in pairs:
        by_up.setdefault(str(u), set()).add(str(d))
    return dg.StaticPartitionMapping(by_up)


class DagsterDvcTranslator:
    """Turns DVC stages into Dagster asset specs. Stateless apart from memo caches; safe to share."""

    def __init__(self) -> None:
        # (id(manifest), stage) -> (manifest, spec); keeping the manifest referenced keeps its id from being reused
        self._spec_cache: Dict[Tuple[int, str], Tuple[DvcManifest, dg.AssetSpec]] = {}
        self._partitions_cache: Dict[Tuple[str, ...], dg.StaticPartitionsDefinition] = {}
        self._inputs_cache: Dict[int, Tuple[DvcManifest, InputCatalog]] = {}

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
        deps += self.get_input_deps(manifest, stage)
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
        md.update(code_references(manifest, stage))
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
        pairs = set(manifest.stage_edges().get((upstream.name, stage.name), []))
        return partition_mapping(pairs, upstream.keys, stage.keys)

    # -------------------------------------------------------------------------------------------- inputs
    def get_inputs(self, manifest: DvcManifest) -> InputCatalog:
        """The input files of this manifest (memoised per manifest); stage asset names are kept off their names."""
        if id(manifest) not in self._inputs_cache:
            reserved = {self.get_asset_key(s).to_user_string() for s in manifest.stages.values()}
            self._inputs_cache[id(manifest)] = (manifest, discover_inputs(manifest, self.is_code_dep, reserved))
        return self._inputs_cache[id(manifest)][1]

    def get_input_asset_key(self, source: InputSource) -> dg.AssetKey:
        return dg.AssetKey([source.name])

    def get_input_spec(self, manifest: DvcManifest, source: InputSource) -> dg.AssetSpec:
        shown = source.pattern.replace("{key}", "<key>")
        partitions = self.get_partitions_def(manifest.stages[source.stage]) if source.stage else None
        readers = self.get_inputs(manifest).readers(source.name)
        return dg.AssetSpec(
            key=self.get_input_asset_key(source),
            description=f"Input `{shown}`, edited by hand (not produced by any stage). Data version: its md5 as DVC "
                        f"computes it. Read by: {', '.join(readers)}.",
            metadata={"dvc/path": shown, "dvc/readers": dg.MetadataValue.json(readers)},
            group_name="inputs",
            partitions_def=partitions,
        )

    def get_input_deps(self, manifest: DvcManifest, stage: DvcStage) -> List[dg.AssetDep]:
        """The inputs the stage's items read, each with the partition mapping of those (input key, item key) edges."""
        catalog = self.get_inputs(manifest)
        deps = []
        for name, pairs in sorted(catalog.edges.get(stage.name, {}).items()):
            source = catalog.sources[name]
            deps.append(dg.AssetDep(self.get_input_asset_key(source),
                                    partition_mapping=partition_mapping(pairs, source.keys, stage.keys)))
        return deps

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
