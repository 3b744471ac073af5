"""``dose_response``: what a channel causes: a strength x timestep-window grid of steered generations.

Partitioned by channel block (``<variant>:<first>-<last>``) like ``priors``; the work is
:func:`ddr_core.dose_response.dose_response_for_variant` through ``compute.run_stage`` (in-process or a SLURM
job). It reads the variant's timestep statistics (required) and, for a labelled variant, ``feature_concepts``
(optional, run it first: the channels' concepts whose classifier probabilities are measured). The metadata
carries the causal test's effects (inside-window vs outside-window vs unsteered, bootstrap over channels,
sign-flip p) pooled over every finished channel of the variant, and the contact sheet.
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
from ddr_assets.output_checks import DOSE_RESPONSE_CHECK, combine_checks, dose_response_check
from ddr_assets.partitions import block_to_variant_mapping
from ddr_core.dose_response import (
    CONTACT_SHEET_FILE,
    DoseResponseConfig,
    effect_lines,
    read_dose_response,
    read_grid,
)
from ddr_core.feature_concepts import markdown_table
from ddr_core.paths import resolve_in_data_root
from ddr_core.records import read_record

DOSE_RESPONSE_CODE_VERSION = "1"
DoseResponseRunConfig = dagster_config_from(DoseResponseConfig, "DoseResponseRunConfig",
                                            extra={"channels": CHANNELS_FIELD, "slurm": SLURM_FIELD})


def _run_variant(run: BlockRun, variant: str, blocks: dict[str, list[int]]) -> VariantWork:
    layout, context, config = run.layout, run.context, run.config
    core = with_variant_overrides(config, DoseResponseConfig,
                                  run.project.variants[variant].overrides.get("dose_response", {}),
                                  asset="dose_response", set_fields=fields_set_in_run_config(context))
    require_upstream(run.storage, "dose_response", list(blocks))
    upstream = {f"timestep_stats/{variant}": read_record(layout.records_dir, "timestep_stats", variant,
                                                         required_by=f"dose_response[{next(iter(blocks))}]")
                ["data_version"]}
    try:
        upstream[f"feature_concepts/{variant}"] = read_record(layout.records_dir, "feature_concepts",
                                                              variant)["data_version"]
    except Exception:  # an unlabelled variant, or not scored yet: activation only
        pass
    channels = [c for chans in blocks.values() for c in chans]
    inputs = {"code_version": DOSE_RESPONSE_CODE_VERSION, **upstream}  # a channel made from the same is kept
    report = run.compute.run_stage(context, "dose_response_for_variant",
                                   {"variant": variant, "channels": channels, "config": core.model_dump(mode="json"),
                                    "inputs": inputs},
                                   storage=run.storage, options=config.slurm)
    result = report["result"]
    out_dir = resolve_in_data_root(layout.data_root, result["out_dir"])
    return VariantWork(upstream=upstream, config=core.model_dump(mode="json"), outputs={"dir": result["out_dir"]},
                       report=report, extra={"result": result, "out_dir": out_dir, "variant": variant,
                                             "channels": channels, "config": core})


def _finish(run: BlockRun, works: list[VariantWork]) -> tuple[dict, list]:
    metadata: dict = {
        "channels_done": sum(len(w.extra["result"]["done"]) for w in works),
        "channels_resumed": sum(len(w.extra["result"]["resumed"]) for w in works),
        "channels_skipped": sum(len(w.extra["result"]["skipped"]) for w in works),
        "generations": sum(w.extra["result"]["images"] for w in works),
    }
    checks = []
    for work in works:
        found = read_dose_response(work.extra["out_dir"])
        core = work.extra["config"]
        checks.append(dose_response_check(
            read_grid(work.extra["out_dir"], work.extra["channels"]), work.extra["channels"],
            {int(k): v for k, v in work.extra["result"]["skipped"].items()}, core.seeds, core.strength_multiples,
            found[0] if found else None, run.layout.data_root))
        if found is None:
            continue
        effects, _, summary = found
        variant = work.extra["variant"]
        metadata[f"effects_{variant}"] = dg.MetadataValue.md(markdown_table(effect_lines(effects)))
        metadata[f"channels_{variant}"] = len(summary["channels"])
        if summary.get("stale_channels"):  # drawn by another run from other settings / older statistics
            metadata[f"stale_channels_{variant}"] = dg.MetadataValue.text(
                f"{summary['stale_channels']} left out of the pooled effects: re-run their blocks")
        sheet = work.extra["out_dir"] / CONTACT_SHEET_FILE
        if sheet.is_file():
            metadata[f"contact_sheet_{variant}"] = image_preview([sheet], size=512)
    return metadata, [combine_checks(DOSE_RESPONSE_CHECK, checks)]



DOSE_RESPONSE = ChannelBlockStage(
    name="dose_response",
    description="Per channel: empty-prompt generations from fixed seeds on a strength x timestep-window grid "
                "(unsteered; steered inside the channel's activity window, in a window of the same width outside "
                "it, everywhere), the channel's re-measured activation and (toy world) the classifier's "
                "probability of its concepts; effects inside-minus-outside with bootstrap intervals over channels.",
    group_name="ground_truth", code_version=DOSE_RESPONSE_CODE_VERSION,
    kinds=frozenset({"pytorch", "parquet"}),
    run_variant=_run_variant, finish=_finish,
    deps=(dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping()),),
    config_cls=DoseResponseRunConfig, uses_compute=True, pool="gpu",
    check_specs=(dg.AssetCheckSpec(DOSE_RESPONSE_CHECK, asset="dose_response",
                                   description="the whole grid per done channel, re-measured activations present, "
                                               "every effect's interval ordered low <= value <= high"),),
)
dose_response = channel_block_asset(DOSE_RESPONSE)
