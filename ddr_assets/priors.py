"""``priors``: images generated from the empty prompt while one channel / SAE feature is steered.

Partitioned by channel block (``<variant>:<first>-<last>``); several channels share each generation
batch, every batch element steering its own channel. Resumable per channel. The work runs through
``compute.run_stage`` (``priors_for_variant``, one call per variant), in-process or as a SLURM job.
A variant's ``overrides.priors`` in the project config (e.g. its own ``steer_strength_scale``) apply to
every field the run config does not set.
"""

import dagster as dg

from ddr_assets.activations import image_preview
from ddr_assets.blocks import CHANNELS_FIELD, BlockRun, ChannelBlockStage, VariantWork, channel_block_asset
from ddr_assets.configs import (
    SLURM_FIELD,
    dagster_config_from,
    fields_set_in_run_config,
    with_variant_overrides,
)
from ddr_assets.lineage import require_upstream
from ddr_assets.partitions import block_to_variant_mapping
from ddr_core.paths import resolve_in_data_root
from ddr_core.priors import PriorsConfig, read_prior
from ddr_core.records import read_record

PRIORS_CODE_VERSION = "1"
PriorsRunConfig = dagster_config_from(PriorsConfig, "PriorsRunConfig",
                                     extra={"channels": CHANNELS_FIELD, "slurm": SLURM_FIELD})


def _run_variant(run: BlockRun, variant: str, blocks: dict[str, list[int]]) -> VariantWork:
    layout, context, config = run.layout, run.context, run.config
    priors_config = with_variant_overrides(config, PriorsConfig, run.project.variants[variant].overrides.get("priors", {}),
                                           asset="priors", set_fields=fields_set_in_run_config(context))
    require_upstream(run.storage, "priors", list(blocks))
    stats = read_record(layout.records_dir, "timestep_stats", variant, required_by=f"priors[{next(iter(blocks))}]")
    channels = [c for chans in blocks.values() for c in chans]
    report = run.compute.run_stage(context, "priors_for_variant",
                                   {"variant": variant, "channels": channels,
                                    "config": priors_config.model_dump(mode="json")},
                                   storage=run.storage, options=config.slurm)
    result = report["result"]
    out_dir = resolve_in_data_root(layout.data_root, result["out_dir"])
    previews = []
    for channel in channels:
        record = read_prior(out_dir, channel)
        if record and record.get("images") and len(previews) < 6:
            previews.append(layout.data_root / record["images"][0])
    return VariantWork(upstream={f"timestep_stats/{variant}": stats["data_version"]},
                       config=priors_config.model_dump(mode="json"), outputs={"dir": result["out_dir"]},
                       report=report, extra={"result": result, "previews": previews})


def _finish(run: BlockRun, works: list[VariantWork]) -> tuple[dict, list]:
    results = [w.extra["result"] for w in works]
    images = sum(r["images"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    previews = [p for w in works for p in w.extra["previews"]][:6]
    return {
        "channels_done": sum(len(r["done"]) for r in results),
        "channels_skipped_inactive_or_unsteered": sum(len(r["skipped"]) for r in results),
        "channels_resumed": sum(len(r["resumed"]) for r in results),
        "images": images,
        "images_per_second": round(images / seconds, 3) if seconds > 0 and images else 0.0,
        "preview": image_preview(previews),
    }, []


PRIORS = ChannelBlockStage(
    name="priors",
    description="Per channel: n_results images from the empty prompt (guidance 1) while the channel "
                "(raw) or its SAE decoder direction is steered at its active timesteps.",
    group_name="priors_and_dreams", code_version=PRIORS_CODE_VERSION, kinds=frozenset({"pytorch", "safetensors"}),
    run_variant=_run_variant, finish=_finish,
    deps=(dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping()),),
    config_cls=PriorsRunConfig, uses_compute=True, pool="gpu",
)
priors = channel_block_asset(PRIORS)
