"""``heatmaps``: where each channel fires in its top dataset examples (regenerated from their recorded seeds), at
the peak step and step by step, and on the toy world the share of its heat on the shape vs chance.

Partitioned by channel block like ``dreams``; reads the variant's ``timestep_stats`` (its dataset examples) and
the capture's recorded seeds. The work runs through ``compute.run_stage`` (``heatmaps_for_variant``), in-process or
as a SLURM job; the compute is :mod:`ddr_core.heatmaps`.
"""

import dagster as dg
import polars as pl

from ddr_assets.activations import image_preview
from ddr_assets.blocks import CHANNELS_FIELD, BlockRun, ChannelBlockStage, VariantWork, channel_block_asset
from ddr_assets.configs import SLURM_FIELD, dagster_config_from, to_core
from ddr_assets.lineage import require_upstream, table_preview
from ddr_assets.output_checks import HEATMAPS_CHECK, combine_checks, heatmaps_check
from ddr_assets.partitions import block_to_variant_mapping
from ddr_core.heatmaps import HeatmapConfig
from ddr_core.paths import resolve_in_data_root
from ddr_core.records import read_record

HEATMAPS_CODE_VERSION = "1"
HeatmapsRunConfig = dagster_config_from(HeatmapConfig, "HeatmapsRunConfig",
                                        extra={"channels": CHANNELS_FIELD, "slurm": SLURM_FIELD})
SCORE_KEYS = ("heat_on_shape", "chance", "ideal_detector", "excess", "p_shape", "p_background")


def _run_variant(run: BlockRun, variant: str, blocks: dict[str, list[int]]) -> VariantWork:
    layout, config = run.layout, run.config
    core = to_core(config, HeatmapConfig, asset="heatmaps")
    require_upstream(run.storage, "heatmaps", list(blocks))
    first = next(iter(blocks))
    capture = run.project.capture_of(variant)
    upstream = {
        f"timestep_stats/{variant}": read_record(layout.records_dir, "timestep_stats", variant,
                                                 required_by=f"heatmaps[{first}]")["data_version"],
        f"activations/{capture}": read_record(layout.records_dir, "activations", capture,
                                              required_by=f"heatmaps[{first}]")["data_version"],
    }
    channels = [c for chans in blocks.values() for c in chans]
    inputs = {"code_version": HEATMAPS_CODE_VERSION, **upstream}  # a channel drawn from the same is kept
    report = run.compute.run_stage(run.context, "heatmaps_for_variant",
                                   {"variant": variant, "channels": channels, "config": core.model_dump(mode="json"),
                                    "inputs": inputs},
                                   storage=run.storage, options=config.slurm)
    result = report["result"]
    table = pl.DataFrame()
    if result.get("table_path"):
        table = pl.read_parquet(resolve_in_data_root(layout.data_root, result["table_path"]))
        table = table.filter(pl.col("channel").is_in(channels))
    previews = [resolve_in_data_root(layout.data_root, p) for p in table["peak_image"].to_list()[:6]] if table.height else []
    return VariantWork(upstream=upstream, config=core.model_dump(mode="json"),
                       outputs={"dir": result["out_dir"], "table": result.get("table_path")}, report=report,
                       extra={"result": result, "table": table, "previews": previews, "channels": channels})


def _finish(run: BlockRun, works: list[VariantWork]) -> tuple[dict, list]:
    results = [w.extra["result"] for w in works]
    tables = [w.extra["table"] for w in works if w.extra["table"].height]
    table = pl.concat(tables, how="diagonal_relaxed") if tables else pl.DataFrame()
    scores = {}
    for work in works:
        summary = work.extra["result"].get("summary") or {}
        if summary.get("scored_examples"):
            scores = {**scores, **{f"{k}": summary.get(k) for k in SCORE_KEYS}}
            scores["excess_interval"] = summary.get("excess_interval")
    rows = (table.select("channel", "rank", "prompt", "peak_timestep", "peak_mean_activation", "heat_on_shape",
                         "chance", "mask_source").head(20).to_dicts() if table.height else [])
    metadata = {
        "channels_done": sum(len(r["channels_done"]) for r in results),
        "channels_resumed": sum(len(r.get("channels_resumed") or []) for r in results),
        "channels_without_examples": sum(len(r["channels_without_examples"]) for r in results),
        "examples": sum(r["examples"] for r in results),
        "seconds": round(sum(r["seconds"] for r in results), 2),
        "examples_table": table_preview(rows),
        "toy_world_score": dg.MetadataValue.json(scores or {"scored": "no toy-world examples in this run"}),
    }
    previews = [p for w in works for p in w.extra["previews"]][:6]
    if previews:
        metadata["preview"] = image_preview(previews)
    checks = [heatmaps_check(w.extra["table"], w.extra["channels"], w.extra["result"]["channels_without_examples"],
                             run.layout.data_root) for w in works]  # per variant: channel numbers are its own
    return metadata, [combine_checks(HEATMAPS_CHECK, checks)]


heatmaps = channel_block_asset(ChannelBlockStage(
    name="heatmaps",
    description=("Per channel: its top dataset examples regenerated from their recorded seeds with the layer's "
                 "per-position activation recorded at every step; the heat at the peak step overlaid on the image, "
                 "an animation over the steps, and (toy world) the share of heat on the shape vs chance."),
    group_name="priors_and_dreams", code_version=HEATMAPS_CODE_VERSION,
    kinds=frozenset({"pytorch", "parquet"}), run_variant=_run_variant, finish=_finish,
    deps=(dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping()),),
    config_cls=HeatmapsRunConfig, uses_compute=True, pool="gpu",
    check_specs=(dg.AssetCheckSpec(HEATMAPS_CHECK, asset="heatmaps",
                                   description="every selected channel has its overlays or a stated reason; "
                                               "scores finite and within [0, 1]"),),
))
