"""``activity_plots``: activity-profile figures per active channel (GIF over peaks, PNG for one)."""


import dagster as dg
import polars as pl
from pydantic import BaseModel, Field

from dagster_project.resources import DdrStorage
from ddr_assets.activations import image_preview
from ddr_assets.configs import dagster_config_from, to_core
from ddr_assets.lineage import lineage_metadata, path_metadata
from ddr_assets.partitions import block_to_variant_mapping, channel_block_partitions, parse_block_key
from ddr_core.plots import render_channel_figure, save_activity_figure
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
    description="Per active channel: activity profile with peaks, max-activation curve and the top "
                "dataset example of each peak; a GIF cycling over the peaks, a PNG when there is one.",
)
def activity_plots(context: dg.AssetExecutionContext, config: ActivityPlotsRunConfig,
                   storage: DdrStorage) -> dg.MaterializeResult:
    variant, first, last = parse_block_key(context.partition_key)
    plots_config = to_core(config, ActivityPlotsConfig, asset="activity_plots")
    layout = storage.layout
    stats_record = read_record(layout.records_dir, "timestep_stats", variant,
                               required_by=f"activity_plots[{context.partition_key}]")
    stats_dir = layout.timestep_stats_dir(variant)
    channels = pl.read_parquet(stats_dir / "channels.parquet").filter(
        pl.col("channel").is_between(first, last))
    if plots_config.only_active:
        channels = channels.filter(pl.col("is_active"))
    out_dir = layout.activity_plots_dir(variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for channel in channels["channel"].to_list():
        frames = render_channel_figure(stats_dir, channel, layout.data_root, dpi=plots_config.dpi)
        path = save_activity_figure(frames, out_dir / f"channel_{channel:05d}",
                                    duration_ms=int(plots_config.frame_duration_s * 1000))
        written.append(path)
    context.log.info(f"{len(written)} figure(s) for channels {first}..{last} of {variant}")
    upstream = {f"timestep_stats/{variant}": stats_record["data_version"]}
    run_config = plots_config.model_dump()
    write_record(layout.records_dir, make_record(
        "activity_plots", context.partition_key, ACTIVITY_PLOTS_CODE_VERSION, run_config, upstream,
        stats_record["data_version"], outputs={"figures": [layout.relative(p) for p in written]},
    ))
    return dg.MaterializeResult(metadata={
        "path": path_metadata(out_dir),
        "figures": len(written),
        "gifs": sum(p.suffix == ".gif" for p in written),
        "channel_range": f"{first}-{last}",
        "preview": image_preview(written[:3], size=320),
        **lineage_metadata(run_config, upstream, ACTIVITY_PLOTS_CODE_VERSION),
    })
