"""``dreams``: latent optimisation maximising each channel's activation, batched across channels.

Partitioned by channel block; starts from the priors by default. The work runs through
``compute.run_stage`` (``dreams_for_variant``, one call per variant), in-process or as a SLURM job. The ``dream_quality`` asset check
re-measures every dream without augmentation and compares it with its start and the channel's top
dataset example.
"""

import math

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from dagster_project.resources import ComputeResource, DdrStorage, compute_metadata
from ddr_assets.activations import image_preview
from ddr_assets.blocks import CHANNELS_FIELD, run_channels
from ddr_assets.configs import (
    SLURM_FIELD,
    dagster_config_from,
    fields_set_in_run_config,
    with_variant_overrides,
)
from ddr_assets.lineage import lineage_metadata, table_preview
from ddr_assets.partitions import block_to_variant_mapping, channel_block_partitions
from ddr_core.config import config_hash
from ddr_core.dreams import DreamConfig
from ddr_core.paths import resolve_in_data_root
from ddr_core.records import make_record, read_record, write_record

DREAMS_CODE_VERSION = "1"
DreamsRunConfig = dagster_config_from(DreamConfig, "DreamsRunConfig", extra={
    "channels": CHANNELS_FIELD,
    # Dagster config has no int-or-keyword union: integers are written as strings here, e.g. ["0", "activity_peaks"]
    "timesteps": (list[str], Field(default=["0", "activity_peaks"],
                                   description="integer timesteps and/or 'activity_peaks' / 'active_timesteps'")),
    "slurm": SLURM_FIELD,
})


def quality_check(quality: pl.DataFrame, min_improved_share: float = 0.5) -> dg.AssetCheckResult:
    """Fail on NaN/inf or failed dreams (naming the channels) and when most dreams do not raise the
    activation over the latent they started from."""
    if quality.height == 0:
        return dg.AssetCheckResult(passed=False, description="no dreams to check")
    failed = quality.filter(pl.col("failed") | pl.col("dream_activation").is_null()
                            | ~pl.col("dream_activation").is_finite())
    failed_channels = sorted(set(failed["channel"].to_list()))
    measured = quality.filter(~pl.col("failed") & pl.col("dream_activation").is_finite()
                              & pl.col("prior_activation").is_finite())
    improved = measured.filter(pl.col("dream_activation") > pl.col("prior_activation"))
    share = improved.height / measured.height if measured.height else 0.0
    ratios = measured["ratio"].drop_nulls().drop_nans().to_numpy() if measured.height else np.array([])
    quantiles = ({f"q{int(q * 100)}": round(float(np.quantile(ratios, q)), 4) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
                 if len(ratios) else {})
    problems = []
    if failed_channels:
        problems.append(f"{failed.height} dream(s) failed or non-finite, channels {failed_channels}")
    if share < min_improved_share:
        problems.append(f"only {share:.0%} of dreams raised the activation over their start "
                        f"(need {min_improved_share:.0%})")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or f"{share:.0%} of dreams raised the activation over their start",
        metadata={
            "dreams": quality.height,
            "failed_channels": dg.MetadataValue.json(failed_channels),
            "improved_share": round(share, 4),
            "ratio_dream_over_top_example": dg.MetadataValue.json(quantiles),
        },
    )


def build_dreams_asset(name: str, no_noise: bool) -> dg.AssetsDefinition:
    """The ``dreams`` asset, or its ``dreams_no_noise`` twin (schedule noise off, written apart)."""

    @dg.asset(
        name=name,
        partitions_def=channel_block_partitions(),
        deps=[dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping()), dg.AssetDep("priors")],
        group_name="priors_and_dreams",
        code_version=DREAMS_CODE_VERSION,
        kinds={"pytorch", "safetensors", "parquet"},
        pool="gpu",
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[dg.AssetCheckSpec("dream_quality", asset=name,
                                       description="no NaN/inf; most dreams raise the activation over their start")],
        description=("Per channel and chosen timestep: latents optimised to maximise the channel's activation "
                     "(penalties, gradient preconditioning/smoothing, augmentations), from the priors."
                     + (" Without the scheduler's noise (the 'no noise' run)." if no_noise else "")),
    )
    def _dreams(context: dg.AssetExecutionContext, config: DreamsRunConfig, storage: DdrStorage,
                compute: ComputeResource) -> dg.MaterializeResult:
        return _materialize_dreams(context, config, storage, compute, name, no_noise)

    return _dreams


def _materialize_dreams(context: dg.AssetExecutionContext, config, storage: DdrStorage, compute: ComputeResource,
                        name: str, no_noise: bool) -> dg.MaterializeResult:
    layout, project = storage.layout, storage.project
    upstream: dict[str, str] = {}
    qualities = []
    totals = {"channels": 0, "resumed": 0, "failures": 0, "element_steps": 0, "seconds": 0.0, "nothing": 0}
    previews = []
    reports = []
    effective: dict[str, dict] = {}
    for variant, blocks in run_channels(context.partition_keys, config.channels).items():
        dream_config = with_variant_overrides(config, DreamConfig, project.variants[variant].overrides.get("dreams", {}),
                                              asset=name,
                                              set_fields=fields_set_in_run_config(context))
        if no_noise:
            dream_config = dream_config.model_copy(update={"see_through_schedule_noise": False})
        stats = read_record(layout.records_dir, "timestep_stats", variant, required_by=f"{name}[{next(iter(blocks))}]")
        variant_upstream = {f"timestep_stats/{variant}": stats["data_version"]}
        if dream_config.use_prior:
            for key in blocks:
                variant_upstream[f"priors/{key}"] = read_record(layout.records_dir, "priors", key,
                                                                required_by=f"{name}[{key}]")["data_version"]
        upstream.update(variant_upstream)
        effective[variant] = dream_config.model_dump(mode="json")
        channels = [c for chans in blocks.values() for c in chans]
        report = compute.run_stage(context, "dreams_for_variant",
                                   {"variant": variant, "channels": channels, "stage": name,
                                    "config": dream_config.model_dump(mode="json")},
                                   storage=storage, options=config.slurm)
        reports.append(report)
        result = report["result"]
        out_dir = resolve_in_data_root(layout.data_root, result["out_dir"])
        totals["channels"] += len(result["channels_done"])
        totals["resumed"] += len(result["channels_skipped"])
        totals["nothing"] += len(result["channels_without_timesteps"])
        totals["failures"] += len(result["failures"])
        totals["element_steps"] += result["element_steps"]
        totals["seconds"] += result["seconds"]
        if not result.get("quality_path"):
            raise dg.Failure(description=f"{name}: the stage for {variant!r} returned no quality table")
        quality = pl.read_parquet(resolve_in_data_root(layout.data_root, result["quality_path"]))
        quality = quality.filter(pl.col("channel").is_in(channels))
        qualities.append(quality)
        run_config = {**dream_config.model_dump(mode="json"), "channels": config.channels}
        for key, chans in blocks.items():
            write_record(layout.records_dir, make_record(
                name, key, DREAMS_CODE_VERSION, run_config, variant_upstream,
                data_version=config_hash({"config": dream_config.config_hash(), "upstream": variant_upstream}),
                outputs={"dir": result["out_dir"], "channels": chans,
                         "partial": config.channels is not None},
            ))
        previews += sorted(out_dir.glob("channel_*/t_*/seed_*.png"))[: 6 - len(previews)]
    quality = pl.concat(qualities) if qualities else pl.DataFrame()
    check = quality_check(quality)
    summary = (quality.group_by("channel").agg(pl.col("dream_activation").max().alias("best_dream"),
                                               pl.col("prior_activation").max().alias("best_start"),
                                               pl.col("ratio").max().alias("best_ratio"))
               .sort("best_ratio", descending=True, nulls_last=True).head(15).to_dicts()) if quality.height else []
    rate = totals["element_steps"] / totals["seconds"] if totals["seconds"] > 0 else 0.0
    return dg.MaterializeResult(
        metadata={
            "channels_done": totals["channels"],
            "channels_resumed": totals["resumed"],
            "channels_without_timesteps_or_prior": totals["nothing"],
            "failed_dreams": totals["failures"],
            "element_steps_per_second": round(rate, 3) if math.isfinite(rate) else 0.0,
            "blocks": dg.MetadataValue.json(list(context.partition_keys)),
            "best_channels": table_preview(summary),
            "preview": image_preview(previews),
            **lineage_metadata({"channels": config.channels, "per_variant": effective}, upstream,
                               DREAMS_CODE_VERSION),
            **compute_metadata(*reports),
        },
        check_results=[check],
    )


dreams = build_dreams_asset("dreams", no_noise=False)
dreams_no_noise = build_dreams_asset("dreams_no_noise", no_noise=True)
