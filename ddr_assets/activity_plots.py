"""``activity_plots``: activity-profile figures per active channel (GIF over peaks, PNG for one)."""


import dagster as dg
import polars as pl
from pydantic import BaseModel, Field

from dagster_project.resources import DdrStorage
from ddr_assets.activations import image_preview
from ddr_assets.configs import dagster_config_from, to_core
from ddr_assets.lineage import lineage_metadata
from ddr_assets.partitions import block_to_variant_mapping, channel_block_partitions, parse_block_key
from ddr_core.plots import write_channel_figures
from ddr_core.records import make_record, read_record, write_record

ACTIVITY_PLOTS_CODE_VERSION = "1"


class ActivityPlotsConfig(BaseModel):
    """Parameters of the activity figures."""

    frame_duration_s: float = Field(2.0, gt=0, description="seconds per peak frame in the GIF")
    dpi: int = Field(80, ge=30, le=300, description="figure resolution")
    only_active: bool = Field(True, description="draw only channels active at some timestep")


ActivityPlotsRunConfig = dagster_config_from(ActivityPlotsConfig, "ActivityPlotsRunConfig")


@dg.asset(
    partitions_def=channel_block_partitions(),
    deps=[dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping())],
    group_name="plots",
    code_version=ACTIVITY_PLOTS_CODE_VERSION,
    kinds={"matplotlib"},
    backfill_policy=dg.BackfillPolicy.single_run(),
    description="Per active channel: activity profile with peaks, max-activation curve and the top "
                "dataset example of each peak; a GIF cycling over the peaks, a PNG when there is one.",
)
def activity_plots(context: dg.AssetExecutionContext, config: ActivityPlotsRunConfig,
                   storage: DdrStorage) -> dg.MaterializeResult:
    plots_config = to_core(config, ActivityPlotsConfig, asset="activity_plots")
    layout = storage.layout
    written: list = []
    upstream: dict[str, str] = {}
    # A backfill over a channel range runs as one run (BackfillPolicy.single_run): every block in it.
    for key in context.partition_keys:
        variant, first, last = parse_block_key(key)
        stats_record = read_record(layout.records_dir, "timestep_stats", variant,
                                   required_by=f"activity_plots[{key}]")
        stats_dir = layout.timestep_stats_dir(variant)
        channels = pl.read_parquet(stats_dir / "channels.parquet").filter(
            pl.col("channel").is_between(first, last))
        if plots_config.only_active:
            channels = channels.filter(pl.col("is_active"))
        block_written = write_channel_figures(
            stats_dir, channels["channel"].to_list(),
            layout.check_output_folder(layout.activity_plots_dir(variant), "figures folder"), layout.data_root,
            dpi=plots_config.dpi, duration_ms=int(plots_config.frame_duration_s * 1000),
            lock_owner=f"dagster run {context.run_id}")
        context.log.info(f"{len(block_written)} figure(s) for channels {first}..{last} of {variant}")
        block_upstream = {f"timestep_stats/{variant}": stats_record["data_version"]}
        write_record(layout.records_dir, make_record(
            "activity_plots", key, ACTIVITY_PLOTS_CODE_VERSION, plots_config.model_dump(), block_upstream,
            stats_record["data_version"], outputs={"figures": [layout.relative(p) for p in block_written]},
        ))
        written += block_written
        upstream.update(block_upstream)
    return dg.MaterializeResult(metadata={
        "figures": len(written),
        "gifs": sum(p.suffix == ".gif" for p in written),
        "blocks": dg.MetadataValue.json(list(context.partition_keys)),
        "preview": image_preview(written[:3], size=320),
        **lineage_metadata(plots_config.model_dump(), upstream, ACTIVITY_PLOTS_CODE_VERSION),
    })
