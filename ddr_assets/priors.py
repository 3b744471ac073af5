"""``priors``: images generated from the empty prompt while one channel / SAE feature is steered.

Partitioned by channel block (``<variant>:<first>-<last>``); several channels share each generation
batch, every batch element steering its own channel. Resumable per channel. The work runs through
``compute.run_stage`` (``priors_for_variant``, one call per variant), in-process or as a SLURM job.
A variant's ``overrides.priors`` in the project config (e.g. its own ``steer_strength_scale``) apply to
every field the run config leaves at its default.
"""

import dagster as dg

from dagster_project.resources import ComputeResource, DdrStorage, compute_metadata
from ddr_assets.activations import image_preview
from ddr_assets.blocks import CHANNELS_FIELD, run_channels
from ddr_assets.configs import (
    SLURM_FIELD,
    dagster_config_from,
    fields_set_in_run_config,
    with_variant_overrides,
)
from ddr_assets.lineage import lineage_metadata
from ddr_assets.partitions import block_to_variant_mapping, channel_block_partitions
from ddr_core.paths import resolve_in_data_root
from ddr_core.priors import PriorsConfig, read_prior
from ddr_core.records import make_record, read_record, write_record

PRIORS_CODE_VERSION = "1"
PriorsRunConfig = dagster_config_from(PriorsConfig, "PriorsRunConfig",
                                     extra={"channels": CHANNELS_FIELD, "slurm": SLURM_FIELD})


@dg.asset(
    partitions_def=channel_block_partitions(),
    deps=[dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping())],
    group_name="priors_and_dreams",
    code_version=PRIORS_CODE_VERSION,
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    backfill_policy=dg.BackfillPolicy.single_run(),
    description="Per channel: n_results images from the empty prompt (guidance 1) while the channel "
                "(raw) or its SAE decoder direction is steered at its active timesteps.",
)
def priors(context: dg.AssetExecutionContext, config: PriorsRunConfig, storage: DdrStorage,
           compute: ComputeResource) -> dg.MaterializeResult:
    layout, project = storage.layout, storage.project
    reports = []
    totals: dict[str, int] = {"done": 0, "skipped": 0, "resumed": 0, "images": 0}
    seconds = 0.0
    upstream: dict[str, str] = {}
    previews = []
    effective: dict[str, dict] = {}
    for variant, blocks in run_channels(context.partition_keys, config.channels).items():
        priors_config = with_variant_overrides(config, PriorsConfig, project.variants[variant].overrides.get("priors", {}),
                                               asset="priors",
                                               set_fields=fields_set_in_run_config(context))
        effective[variant] = priors_config.model_dump(mode="json")
        stats = read_record(layout.records_dir, "timestep_stats", variant,
                            required_by=f"priors[{next(iter(blocks))}]")
        upstream[f"timestep_stats/{variant}"] = stats["data_version"]
        channels = [c for chans in blocks.values() for c in chans]
        report = compute.run_stage(context, "priors_for_variant",
                                   {"variant": variant, "channels": channels,
                                    "config": priors_config.model_dump(mode="json")},
                                   storage=storage, options=config.slurm)
        reports.append(report)
        result = report["result"]
        out_dir = resolve_in_data_root(layout.data_root, result["out_dir"])
        for key in ("done", "resumed", "skipped"):
            totals[key] += len(result[key])
        totals["images"] += result["images"]
        seconds += result["seconds"]
        run_config = {**priors_config.model_dump(mode="json"), "channels": config.channels}
        for key, chans in blocks.items():
            write_record(layout.records_dir, make_record(
                "priors", key, PRIORS_CODE_VERSION, run_config, {f"timestep_stats/{variant}": stats["data_version"]},
                data_version=f"{priors_config_hash(priors_config)}-{stats['data_version']}",
                outputs={"dir": result["out_dir"], "channels": chans,
                         "partial": config.channels is not None},
            ))
        for channel in channels:
            record = read_prior(out_dir, channel)
            if record and record.get("images") and len(previews) < 6:
                previews.append(layout.data_root / record["images"][0])
    return dg.MaterializeResult(metadata={
        "channels_done": totals["done"],
        "channels_skipped_inactive_or_unsteered": totals["skipped"],
        "channels_resumed": totals["resumed"],
        "images": totals["images"],
        "images_per_second": round(totals["images"] / seconds, 3) if seconds > 0 and totals["images"] else 0.0,
        "blocks": dg.MetadataValue.json(list(context.partition_keys)),
        "preview": image_preview(previews),
        **lineage_metadata({"channels": config.channels, "per_variant": effective}, upstream, PRIORS_CODE_VERSION),
        **compute_metadata(*reports),
    })


def priors_config_hash(config: PriorsConfig) -> str:
    from ddr_core.config import config_hash

    return config_hash(config.model_dump(mode="json"))
