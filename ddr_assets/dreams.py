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

from ddr_assets.activations import image_preview
from ddr_assets.blocks import CHANNELS_FIELD, BlockRun, ChannelBlockStage, VariantWork, channel_block_asset
from ddr_assets.configs import (
    PERFORMANCE_FIELD,
    SLURM_FIELD,
    dagster_config_from,
    fields_set_in_run_config,
    performance_args,
    with_variant_overrides,
)
from ddr_assets.lineage import require_upstream, table_preview
from ddr_assets.partitions import block_to_variant_mapping
from ddr_core.dream_verdict import VERDICT_SCHEMA, with_raised
from ddr_core.dreams import DreamConfig
from ddr_core.paths import resolve_in_data_root
from ddr_core.records import read_record

DREAMS_CODE_VERSION = "1"
DreamsRunConfig = dagster_config_from(DreamConfig, "DreamsRunConfig", extra={
    "channels": CHANNELS_FIELD,
    # Dagster config has no int-or-keyword union: integers are written as strings here, e.g. ["0", "activity_peaks"]
    "timesteps": (list[str], Field(default=["0", "activity_peaks"],
                                   description="integer timesteps and/or 'activity_peaks' / 'active_timesteps' / "
                                               "'observed_peaks'")),
    "slurm": SLURM_FIELD,
    "performance": PERFORMANCE_FIELD,
})


def quality_check(quality: pl.DataFrame, min_raised_share: float = 0.5) -> dg.AssetCheckResult:
    """Fail on NaN/inf or failed dreams (naming the channels) and on a variant where most dreams are not
    **raised** (their activation not above their start's noise: :func:`ddr_core.dream_verdict.with_raised`, the
    verdict the shards, inspector and HTML export show). ``quality`` may hold several variants (a ``variant``
    column); each is judged on its own."""
    if quality.height == 0:
        return dg.AssetCheckResult(passed=False, description="no dreams to check")
    if not all(c in quality.columns for c in VERDICT_SCHEMA):
        quality = with_raised(quality)
    failed = quality.filter(pl.col("failed") | pl.col("dream_activation").is_null()
                            | ~pl.col("dream_activation").is_finite())
    failed_channels = sorted(set(failed["channel"].to_list()))
    measured = quality.filter(~pl.col("failed") & pl.col("dream_activation").is_finite()
                              & pl.col("prior_activation").is_finite())
    raised = quality.filter(pl.col("raised"))
    share = raised.height / quality.height
    by_variant = ({str(v): frame for (v,), frame in quality.group_by("variant", maintain_order=True)}
                  if "variant" in quality.columns else {"": quality})
    shares = {variant: frame["raised"].sum() / frame.height for variant, frame in by_variant.items()}
    ratios = measured["ratio"].drop_nulls().drop_nans().to_numpy() if measured.height else np.array([])
    quantiles = ({f"q{int(q * 100)}": round(float(np.quantile(ratios, q)), 4) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
                 if len(ratios) else {})
    problems = []
    if failed_channels:
        problems.append(f"{failed.height} dream(s) failed or non-finite, channels {failed_channels}")
    for variant, variant_share in shares.items():
        if variant_share < min_raised_share:
            frame = by_variant[variant]
            problems.append(f"only {variant_share:.0%} of dreams raised the activation above their start's noise"
                            + (f" in {variant}" if variant else "")
                            + f" ({int(frame['raised'].sum())} of {frame.height}; need {min_raised_share:.0%}); the "
                            f"others are not shown as dreams")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or f"{share:.0%} of dreams raised the activation above their start's noise",
        metadata={
            "dreams": quality.height,
            "failed_channels": dg.MetadataValue.json(failed_channels),
            "raised_share": round(share, 4),
            "raised_share_by_variant": dg.MetadataValue.json({k: round(float(v), 4) for k, v in shares.items()}),
            "not_raised_dreams": quality.height - raised.height,
            "ratio_dream_over_top_example": dg.MetadataValue.json(quantiles),
        },
    )


def _dreams_stage(name: str, no_noise: bool) -> ChannelBlockStage:
    """The ``dreams`` stage, or its ``dreams_no_noise`` twin (schedule noise off, written apart)."""

    def run_variant(run: BlockRun, variant: str, blocks: dict[str, list[int]]) -> VariantWork:
        layout, context, config = run.layout, run.context, run.config
        dream_config = with_variant_overrides(config, DreamConfig,
                                              run.project.variants[variant].overrides.get("dreams", {}),
                                              asset=name, set_fields=fields_set_in_run_config(context))
        if no_noise:
            dream_config = dream_config.model_copy(update={"see_through_schedule_noise": False})
        require_upstream(run.storage, name, list(blocks), use_prior=dream_config.use_prior)
        stats = read_record(layout.records_dir, "timestep_stats", variant, required_by=f"{name}[{next(iter(blocks))}]")
        upstream = {f"timestep_stats/{variant}": stats["data_version"]}
        if dream_config.start_from == "prior":
            for key in blocks:
                upstream[f"priors/{key}"] = read_record(layout.records_dir, "priors", key,
                                                        required_by=f"{name}[{key}]")["data_version"]
        if dream_config.start_from == "example":  # regenerated from the capture's recorded seeds
            capture = run.project.capture_of(variant)
            upstream[f"activations/{capture}"] = read_record(layout.records_dir, "activations", capture,
                                                             required_by=f"{name}[{next(iter(blocks))}]")["data_version"]
        channels = [c for chans in blocks.values() for c in chans]
        report = run.compute.run_stage(context, "dreams_for_variant",
                                       {"variant": variant, "channels": channels, "stage": name,
                                        "config": dream_config.model_dump(mode="json"),
                                        **performance_args(config, asset=name)},
                                       storage=run.storage, options=config.slurm)
        result = report["result"]
        out_dir = resolve_in_data_root(layout.data_root, result["out_dir"])
        if not result.get("quality_path"):
            raise dg.Failure(description=f"{name}: the stage for {variant!r} returned no quality table")
        quality = pl.read_parquet(resolve_in_data_root(layout.data_root, result["quality_path"]))
        quality = quality.filter(pl.col("channel").is_in(channels)).with_columns(pl.lit(variant).alias("variant"))
        return VariantWork(upstream=upstream, config=dream_config.model_dump(mode="json"),
                           outputs={"dir": result["out_dir"]}, report=report,
                           extra={"result": result, "quality": quality,
                                  "previews": sorted(out_dir.glob("channel_*/t_*/seed_*.png"))[:6]})

    def finish(run: BlockRun, works: list[VariantWork]) -> tuple[dict, list]:
        results = [w.extra["result"] for w in works]
        qualities = [w.extra["quality"] for w in works]
        quality = pl.concat(qualities) if qualities else pl.DataFrame()
        summary = (quality.group_by("channel").agg(pl.col("dream_activation").max().alias("best_dream"),
                                                   pl.col("prior_activation").max().alias("best_start"),
                                                   pl.col("ratio").max().alias("best_ratio"))
                   .sort("best_ratio", descending=True, nulls_last=True).head(15).to_dicts()) if quality.height else []
        steps, seconds = sum(r["element_steps"] for r in results), sum(r["seconds"] for r in results)
        rate = steps / seconds if seconds > 0 else 0.0
        return {
            "channels_done": sum(len(r["channels_done"]) for r in results),
            "channels_resumed": sum(len(r["channels_skipped"]) for r in results),
            "channels_without_timesteps_or_prior": sum(len(r["channels_without_timesteps"]) for r in results),
            "failed_dreams": sum(len(r["failures"]) for r in results),
            "not_raised_dreams": int((~quality["raised"]).sum()) if "raised" in quality.columns else 0,
            "skipped_timesteps": dg.MetadataValue.json(
                [s for r in results for s in r.get("skipped_timesteps") or []][:200]),
            "n_skipped_timesteps": sum(len(r.get("skipped_timesteps") or []) for r in results),
            "element_steps_per_second": round(rate, 3) if math.isfinite(rate) else 0.0,
            "best_channels": table_preview(summary),
            "preview": image_preview([p for w in works for p in w.extra["previews"]][:6]),
        }, [quality_check(quality)]

    return ChannelBlockStage(
        name=name,
        description=("Per channel and chosen timestep: latents optimised to maximise the channel's activation "
                     "(penalties, gradient preconditioning/smoothing, augmentations), from the priors."
                     + (" Without the scheduler's noise (the 'no noise' run)." if no_noise else "")),
        group_name="priors_and_dreams", code_version=DREAMS_CODE_VERSION,
        kinds=frozenset({"pytorch", "safetensors", "parquet"}), run_variant=run_variant, finish=finish,
        deps=(dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping()), dg.AssetDep("priors")),
        config_cls=DreamsRunConfig, uses_compute=True, pool="gpu",
        check_specs=(dg.AssetCheckSpec("dream_quality", asset=name,
                                       description="no NaN/inf; in each variant most dreams raise the activation "
                                                   "above their start's noise"),),
    )


dreams = channel_block_asset(_dreams_stage("dreams", no_noise=False))
dreams_no_noise = channel_block_asset(_dreams_stage("dreams_no_noise", no_noise=True))
