"""``activity_plots``: activity-profile figures per active channel (GIF over peaks, PNG for one)."""


import dagster as dg
import polars as pl
from pydantic import BaseModel, Field

from ddr_assets.activations import image_preview
from ddr_assets.blocks import BlockRun, ChannelBlockStage, VariantWork, channel_block_asset
from ddr_assets.configs import dagster_config_from, to_core
from ddr_assets.lineage import require_upstream
from ddr_assets.partitions import block_to_variant_mapping
from ddr_core.config import config_hash
from ddr_core.plots import write_channel_figures
from ddr_core.records import read_record

ACTIVITY_PLOTS_CODE_VERSION = "1"


class ActivityPlotsConfig(BaseModel):
    """Parameters of the activity figures."""

    frame_duration_s: float = Field(2.0, gt=0, description="seconds per peak frame in the GIF")
    dpi: int = Field(80, ge=30, le=300, description="figure resolution")
    only_active: bool = Field(True, description="draw only channels active at some timestep")


ActivityPlotsRunConfig = dagster_config_from(ActivityPlotsConfig, "ActivityPlotsRunConfig")


def _run_variant(run: BlockRun, variant: str, blocks: dict[str, list[int]]) -> VariantWork:
    plots_config = to_core(run.config, ActivityPlotsConfig, asset="activity_plots")
    layout = run.layout
    require_upstream(run.storage, "activity_plots", list(blocks))
    stats_record = read_record(layout.records_dir, "timestep_stats", variant,
                               required_by=f"activity_plots[{next(iter(blocks))}]")
    stats_dir = layout.timestep_stats_dir(variant)
    table = pl.read_parquet(stats_dir / "channels.parquet")
    if plots_config.only_active:
        table = table.filter(pl.col("is_active"))
    drawn = set(table["channel"].to_list())
    written, per_block = [], {}
    for key, channels in blocks.items():
        block_written = write_channel_figures(
            stats_dir, [c for c in channels if c in drawn],
            layout.check_output_folder(layout.activity_plots_dir(variant), "figures folder"), layout.data_root,
            dpi=plots_config.dpi, duration_ms=int(plots_config.frame_duration_s * 1000),
            lock_owner=f"dagster run {run.context.run_id}",
            stamp=f"{ACTIVITY_PLOTS_CODE_VERSION}-{stats_record['data_version']}-{config_hash(plots_config.model_dump())}")
        run.context.log.info(f"{len(block_written)} figure(s) for channels {channels[0]}..{channels[-1]} of {variant}")
        per_block[key] = {"figures": [layout.relative(p) for p in block_written]}
        written += block_written
    return VariantWork(upstream={f"timestep_stats/{variant}": stats_record["data_version"]},
                       config=plots_config.model_dump(), block_outputs=per_block, extra=written)


def _finish(run: BlockRun, works: list[VariantWork]) -> tuple[dict, list]:
    written = [p for w in works for p in w.extra]
    return {"figures": len(written), "gifs": sum(p.suffix == ".gif" for p in written),
            "preview": image_preview(written[:3], size=320)}, []


activity_plots = channel_block_asset(ChannelBlockStage(
    name="activity_plots",
    description="Per active channel: activity profile with peaks, max-activation curve and the top "
                "dataset example of each peak; a GIF cycling over the peaks, a PNG when there is one.",
    group_name="plots", code_version=ACTIVITY_PLOTS_CODE_VERSION, kinds=frozenset({"matplotlib"}),
    run_variant=_run_variant, finish=_finish,
    deps=(dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping()),),
    config_cls=ActivityPlotsRunConfig,
    lineage_config=lambda run, works: works[0].config if works else {},
))
