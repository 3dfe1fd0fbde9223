"""`dvc_assets(manifest)`: the DVC pipeline as Dagster multi-assets, like dagster-dbt's `@dbt_assets`.

One `multi_asset` per partitions definition (a step maps to one partitions definition): the plain stages together,
the stages that share a foreach key set (spec_chunks, raw_cots, judged_cots over the categories) together, and so on.
Each is `can_subset=True`, so Dagster can run any selection of its assets, and split it into several steps where the
graph goes in and out of it (base_model -> raw_cots -> sft_dataset). Every op joins the pool `dvc`, which the instance
limits to one slot: DVC holds a repository lock while it reproduces, so only one `dvc repro` may run at a time.
"""
# (no `from __future__ import annotations`: Dagster reads the op signatures' annotations at definition time)

import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import dagster as dg

from .manifest import DvcManifest
from .plan import check_item_keys
from .resource import DVC_POOL, DvcCliResource
from .translator import DagsterDvcTranslator

Body = Callable[..., object]


def _op_name(manifest: DvcManifest, stages: List[str], keys: Optional[Tuple[str, ...]], prefix: str) -> str:
    """dvc_stages (plain stages); dvc_categories for `foreach: ${categories}`; else dvc_<first stage>_items."""
    if keys is None:
        return f"{prefix}_stages"
    source = manifest.stages[stages[0]].foreach_source or ""
    m = re.fullmatch(r"\$\{\s*([A-Za-z_][\w.]*)\s*\}", source.strip())
    return f"{prefix}_" + re.sub(r"\W", "_", m.group(1) if m else f"{stages[0]}_items")


def dvc_assets(
    manifest: DvcManifest,
    *,
    translator: Optional[DagsterDvcTranslator] = None,
    select: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = (),
    pool: str = DVC_POOL,
    body: Optional[Body] = None,
    name: str = "dvc",
) -> List[dg.AssetsDefinition]:
    """Build the multi-assets for the stages of `manifest` (all, or `select` minus `exclude`).

    Args:
        manifest: the parsed DVC project.
        translator: turns stages into asset specs; subclass `DagsterDvcTranslator` to customise.
        select / exclude: dvc.yaml stage names to include / leave out.
        pool: the Dagster concurrency pool of the ops (limit it to 1 in the instance config).
        body: replaces the default op body `yield from dvc.repro(context, translator=translator).stream()`;
            called as `body(context, dvc, translator)`.
        name: op name prefix (`dvc_stages`, `dvc_categories`); give each call its own when splitting the stages over
            several calls, e.g. the training stages into their own op for per-op executor config (GPU pods).
    Returns:
        one AssetsDefinition per partitions definition.
    """
    translator = translator or DagsterDvcTranslator()
    check_item_keys(manifest)  # a category name with path characters is a name error, not a graph error
    wanted = [s for s in manifest.stage_order() if (select is None or s in set(select)) and s not in set(exclude)]
    unknown = sorted(set(select or ()) - set(manifest.stages))
    if unknown:
        raise ValueError(f"select: not a dvc.yaml stage: {', '.join(unknown)}")
    groups: Dict[Optional[Tuple[str, ...]], List[str]] = {}
    for stage_name in wanted:
        stage = manifest.stages[stage_name]
        groups.setdefault(tuple(stage.keys) if stage.is_template else None, []).append(stage_name)

    defs = []
    for keys, stages in groups.items():
        specs = [translator.get_asset_spec(manifest, s) for s in stages]
        check_specs = [c for s in stages for c in translator.get_check_specs(manifest, s)]
        op_name = _op_name(manifest, stages, keys, name)
        defs.append(_multi_asset(op_name, specs, check_specs, stages, pool, translator, body))
    return defs


def _multi_asset(name: str, specs: List[dg.AssetSpec], check_specs: List[dg.AssetCheckSpec], stages: List[str],
                 pool: str, translator: DagsterDvcTranslator, body: Optional[Body]) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=name,
        specs=specs,
        check_specs=check_specs,
        can_subset=True,
        pool=pool,
        op_tags={"dvc/stages": ",".join(stages)},
        description=f"`dvc repro --single-item` for the selected items of: {', '.join(stages)}",
    )
    def _dvc_multi_asset(context: dg.AssetExecutionContext, dvc: DvcCliResource):
        if body is not None:
            yield from body(context, dvc, translator)  # type: ignore[misc]
        else:
            yield from dvc.repro(context, translator=translator).stream()

    return _dvc_multi_asset
