"""``timestep_stats``: per-variant statistics of when each channel is active (DuckDB/Polars over Parquet)."""


import shutil

import dagster as dg
from pydantic import Field

from ddr_assets.configs import (
    SLURM_FIELD,
    dagster_config_from,
    fields_set_in_run_config,
    with_variant_overrides,
)
from ddr_assets.lineage import lineage_metadata, path_metadata, require_upstream, table_preview
from ddr_assets.partitions import variant_partitions, variant_to_capture_mapping
from ddr_core.activation_store import ActivationStore
from ddr_core.records import make_record, read_record, write_record
from ddr_core.statistics import TimestepStatsConfig, compute_timestep_stats
from ddr_core.statistics_shards import channel_ranges, finished_shard, merge_stats_shards
from ddr_resources.resources import ComputeResource, DdrStorage, compute_metadata

TIMESTEP_STATS_CODE_VERSION = "1"
TimestepStatsRunConfig = dagster_config_from(TimestepStatsConfig, "TimestepStatsRunConfig", extra={
    "channel_shards": (int, Field(1, ge=1, description="split the reading of the store into this many channel "
                                                       "ranges, each one compute-resource call (in compute mode "
                                                       "slurm one SLURM job each, all run in parallel; locally "
                                                       "one after the other), merged here; results equal one run")),
    "slurm": SLURM_FIELD,
})


@dg.asset(
    partitions_def=variant_partitions(),
    deps=[dg.AssetDep("activations", partition_mapping=variant_to_capture_mapping())],
    group_name="statistics",
    code_version=TIMESTEP_STATS_CODE_VERSION,
    kinds={"duckdb", "polars", "parquet"},
    automation_condition=dg.AutomationCondition.eager(),
    description="Frequency in top-k, max activation, active timesteps, activity peaks and top dataset "
                "examples per channel and timestep; Parquet + a stats.duckdb with views over them.",
)
def timestep_stats(context: dg.AssetExecutionContext, config: TimestepStatsRunConfig,
                   storage: DdrStorage, compute: ComputeResource) -> dg.MaterializeResult:
    variant = context.partition_key
    stats_config = with_variant_overrides(  # a variant's overrides.timestep_stats (e.g. profile: sampled)
        config, TimestepStatsConfig, storage.project.variants[variant].overrides.get("timestep_stats", {}),
        asset="timestep_stats", set_fields=fields_set_in_run_config(context))
    layout = storage.layout
    group = storage.project.capture_of(variant)
    require_upstream(storage, "timestep_stats", variant)
    upstream_record = read_record(layout.records_dir, "activations", group,
                                  required_by=f"timestep_stats[{variant}]")
    upstream = {f"activations/{group}": upstream_record["data_version"]}
    out_dir = layout.check_output_folder(layout.timestep_stats_dir(variant), "statistics folder")
    store = ActivationStore(layout.activations_dir(group))
    reports = []
    if config.channel_shards > 1:  # ddr_core.statistics_shards: each range one stage call, then the merge here
        ranges = channel_ranges(store.width(variant), config.channel_shards)
        shards_dir = layout.check_output_folder(out_dir.with_name(f".{variant}.shards"), "statistics shards folder")
        todo = [(a, b) for a, b in ranges if finished_shard(shards_dir, a, b, stats_config) is None]
        if len(todo) < len(ranges):
            context.log.info(f"{len(ranges) - len(todo)} of {len(ranges)} channel shards already finished "
                             f"(an earlier attempt): not submitted again")
        reports = compute.run_stages(context, "timestep_stats_shard", [  # parallel jobs on SLURM
            {"variant": variant, "channels": [first, stop], "config": stats_config.model_dump(mode="json")}
            for first, stop in todo], storage=storage, options=config.slurm)
        summary = merge_stats_shards(store, variant, out_dir, stats_config, shards_dir, ranges,
                                     log=context.log.info, lock_owner=f"dagster run {context.run_id}")
        shutil.rmtree(shards_dir, ignore_errors=True)  # a resume cache until the merge has succeeded
    else:
        summary = compute_timestep_stats(store, variant, out_dir, stats_config, log=context.log.info,
                                         lock_owner=f"dagster run {context.run_id}")
    run_config = stats_config.resolved()
    data_version = summary.config_hash + "-" + upstream_record["data_version"]
    write_record(layout.records_dir, make_record(
        "timestep_stats", variant, TIMESTEP_STATS_CODE_VERSION, run_config, upstream, data_version,
        outputs={"dir": layout.relative(out_dir), "active_channels": summary.active_channel_count,
                 "width": summary.width},
    ))
    return dg.MaterializeResult(
        metadata={
            "path": path_metadata(out_dir),
            "duckdb": path_metadata(out_dir / "stats.duckdb"),
            "active_channel_count": summary.active_channel_count,
            "channels": summary.width,
            "generations": summary.n_generations,
            "timesteps": len(summary.timesteps),
            "peaks": summary.peak_count,
            "most_active_channels": table_preview(summary.preview),
            **lineage_metadata(run_config, upstream, TIMESTEP_STATS_CODE_VERSION),
            **({"channel_shards": config.channel_shards, "channel_shards_run": len(reports),
                **compute_metadata(*reports)} if config.channel_shards > 1 else {}),
        },
        data_version=dg.DataVersion(data_version),
    )
