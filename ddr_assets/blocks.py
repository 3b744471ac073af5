"""Channel-block assets: one factory for every asset partitioned by ``<variant>:<first>-<last>``.

A run of such an asset covers one block or, as a single-run backfill, many; it works variant by variant
(one stage call per variant, all its selected channels at once) and then, for every block, writes the
block's record (``_records/<asset>/<block>.json``) and returns **one** data version, the same in the
records and in Dagster (``dg.DataVersion``), so Dagster's staleness view and the ``_records/`` lineage
agree. What differs between stages is a :class:`ChannelBlockStage`: how a variant is run
(``run_variant``) and what the run's metadata and checks say (``finish``).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from pydantic import Field

from ddr_assets.lineage import lineage_metadata
from ddr_assets.partitions import channel_block_partitions, parse_block_key
from ddr_core.config import config_hash
from ddr_core.records import make_record, write_record
from ddr_resources.resources import ComputeResource, DdrStorage, compute_metadata

CHANNELS_FIELD = (
    list[int] | None,
    Field(None, description="explicit channels (a few chosen ones, for quick looks and sweeps); "
                            "they must lie in the selected channel blocks; default: every channel of them"),
)


def run_channels(partition_keys: Sequence[str], explicit: list[int] | None) -> dict[str, dict[str, list[int]]]:
    """variant -> {block key -> channels to process}, in partition order.

    Raises:
        dagster.Failure: an explicit channel lies outside every selected block.
    """
    plan: dict[str, dict[str, list[int]]] = {}
    wanted = set(explicit) if explicit is not None else None
    for key in partition_keys:
        variant, first, last = parse_block_key(key)
        channels = [c for c in range(first, last + 1) if wanted is None or c in wanted]
        if channels:
            plan.setdefault(variant, {})[key] = channels
    if wanted is not None:
        covered = {c for blocks in plan.values() for chans in blocks.values() for c in chans}
        outside = sorted(wanted - covered)
        if outside:
            raise dg.Failure(description=f"channels {outside} are not in the selected blocks "
                                         f"{list(partition_keys)}: select the blocks that contain them")
    return plan


@dataclass
class BlockRun:
    """One materialization of a channel-block asset: what every stage function is given."""

    context: dg.AssetExecutionContext
    config: Any
    storage: DdrStorage
    compute: ComputeResource | None

    @property
    def layout(self):
        return self.storage.layout

    @property
    def project(self):
        return self.storage.project

    @property
    def explicit_channels(self) -> list[int] | None:
        return getattr(self.config, "channels", None) if self.config is not None else None


@dataclass
class VariantWork:
    """What a stage did for one variant of a run.

    ``upstream``: the upstream data versions it consumed; ``config``: its effective config (lineage);
    ``outputs``: recorded in every block's record (with the block's ``channels``); ``block_outputs``: per
    block extras; ``report``: the compute report (hosts, SLURM job ids); ``extra``: anything ``finish``
    needs (tables, previews, counts).
    """

    upstream: dict[str, str]
    config: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    block_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    extra: Any = None


@dataclass(frozen=True)
class ChannelBlockStage:
    """The declaration of a channel-block asset (see :func:`channel_block_asset`)."""

    name: str
    description: str
    group_name: str
    code_version: str
    kinds: frozenset[str]
    run_variant: Callable[[BlockRun, str, dict[str, list[int]]], VariantWork]
    finish: Callable[[BlockRun, list[VariantWork]], tuple[dict[str, Any], list[dg.AssetCheckResult]]]
    deps: tuple[dg.AssetDep, ...] = ()
    config_cls: type | None = None
    uses_compute: bool = False
    pool: str | None = None
    check_specs: tuple[dg.AssetCheckSpec, ...] = ()
    lineage_config: Callable[[BlockRun, list[VariantWork]], dict[str, Any]] | None = None


def run_blocks(stage: ChannelBlockStage, run: BlockRun) -> dg.MaterializeResult:
    """The loop every channel-block asset shares: variant by variant, then one record per block with the
    run's one data version, lineage and compute metadata."""
    works: list[tuple[str, dict[str, list[int]], VariantWork]] = [
        (variant, blocks, stage.run_variant(run, variant, blocks))
        for variant, blocks in run_channels(run.context.partition_keys, run.explicit_channels).items()]
    upstream = {k: v for _, _, work in works for k, v in work.upstream.items()}
    configs = {variant: work.config for variant, _, work in works}
    data_version = config_hash({"code_version": stage.code_version, "config": configs, "upstream": upstream,
                                "channels": run.explicit_channels})
    for _, blocks, work in works:
        for key, channels in blocks.items():
            write_record(run.layout.records_dir, make_record(
                stage.name, key, stage.code_version,
                {**work.config, "channels": run.explicit_channels}, work.upstream, data_version,
                outputs={**work.outputs, **work.block_outputs.get(key, {}), "channels": channels,
                         "partial": run.explicit_channels is not None},
            ))
    done = [work for _, _, work in works]
    metadata, checks = stage.finish(run, done)
    lineage = (stage.lineage_config(run, done) if stage.lineage_config
               else {"channels": run.explicit_channels, "per_variant": configs})
    reports = [work.report for work in done if work.report is not None]
    return dg.MaterializeResult(
        metadata={**metadata, "blocks": dg.MetadataValue.json(list(run.context.partition_keys)),
                  **lineage_metadata(lineage, upstream, stage.code_version),
                  **(compute_metadata(*reports) if reports else {})},
        data_version=dg.DataVersion(data_version),
        check_results=checks or None,
    )


def channel_block_asset(stage: ChannelBlockStage) -> dg.AssetsDefinition:
    """A Dagster asset partitioned by channel block, run as one run per backfill, from ``stage``."""
    parameters = [inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=dg.AssetExecutionContext)]
    if stage.config_cls is not None:
        parameters.append(inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            annotation=stage.config_cls))
    parameters.append(inspect.Parameter("storage", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=DdrStorage))
    if stage.uses_compute:
        parameters.append(inspect.Parameter("compute", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            annotation=ComputeResource))
    signature = inspect.Signature(parameters, return_annotation=dg.MaterializeResult)

    def materialize(*args: Any, **kwargs: Any) -> dg.MaterializeResult:
        bound = signature.bind(*args, **kwargs).arguments
        return run_blocks(stage, BlockRun(context=bound["context"], config=bound.get("config"),
                                          storage=bound["storage"], compute=bound.get("compute")))

    materialize.__name__ = stage.name
    materialize.__doc__ = stage.description
    materialize.__signature__ = signature  # type: ignore[attr-defined]
    materialize.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": dg.MaterializeResult}
    with warnings.catch_warnings():
        # BackfillPolicy.single_run() is what makes a block range one run; Dagster marks the parameter beta and
        # would warn on every CLI call and code-location load. Only that warning, only here.
        warnings.filterwarnings("ignore", category=dg.BetaWarning, message=r"Parameter `backfill_policy`")
        return _block_asset(stage, materialize)


def _block_asset(stage: ChannelBlockStage, materialize: Callable[..., dg.MaterializeResult]) -> dg.AssetsDefinition:
    return dg.asset(
        name=stage.name,
        partitions_def=channel_block_partitions(),
        deps=list(stage.deps),
        group_name=stage.group_name,
        code_version=stage.code_version,
        kinds=set(stage.kinds),
        pool=stage.pool,
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=list(stage.check_specs) or None,
        description=stage.description,
    )(materialize)

