"""``cfg_contrast``: per channel, the conditional vs the unconditional CFG half (which features the text drives).

Partitioned by variant like ``timestep_stats`` and downstream of the same capture; it reads the store's two
halves batch by batch (:func:`ddr_core.cfg_contrast.compute_cfg_contrast`). A guidance-free capture gives a
summary saying there is one half and no tables.

A re-run whose capture (the activations' data version), settings and code version are those of the last run's
record, with its tables whole, keeps them (metadata ``reused``); anything changed computes them again. The check
``cfg_contrast_verdicts`` (:mod:`ddr_assets.output_checks`) runs on every materialization.
"""

import dagster as dg

from ddr_assets.configs import dagster_config_from
from ddr_assets.lineage import lineage_metadata, path_metadata, require_upstream, table_preview
from ddr_assets.output_checks import CFG_CONTRAST_CHECK, cfg_contrast_check
from ddr_assets.partitions import variant_partitions, variant_to_capture_mapping
from ddr_core.activation_store import ActivationStore
from ddr_core.cfg_contrast import (
    CHANNELS_FILE,
    CfgContrastConfig,
    compute_cfg_contrast,
    finished_cfg_contrast,
)
from ddr_core.records import MissingUpstreamError, make_record, read_record, write_record
from ddr_resources.resources import DdrStorage

CFG_CONTRAST_CODE_VERSION = "1"
CfgContrastRunConfig = dagster_config_from(CfgContrastConfig, "CfgContrastRunConfig")


@dg.asset(
    partitions_def=variant_partitions(),
    deps=[dg.AssetDep("activations", partition_mapping=variant_to_capture_mapping())],
    group_name="statistics",
    code_version=CFG_CONTRAST_CODE_VERSION,
    kinds={"polars", "parquet"},
    description="Conditional vs unconditional CFG half per channel and timestep: the prompt's effect on each "
                "feature with its interval and p over prompts (text-driven vs image-driven features).",
    check_specs=[dg.AssetCheckSpec(CFG_CONTRAST_CHECK, asset="cfg_contrast",
                                   description="q-values in [0, 1], intervals ordered, each verdict the one its "
                                               "q-value and sign give")],
)
def cfg_contrast(context: dg.AssetExecutionContext, config: CfgContrastRunConfig,
                 storage: DdrStorage) -> dg.MaterializeResult:
    variant = context.partition_key
    contrast_config = CfgContrastConfig(**config.model_dump())
    layout = storage.layout
    group = storage.project.capture_of(variant)
    require_upstream(storage, "cfg_contrast", variant)
    upstream_record = read_record(layout.records_dir, "activations", group, required_by=f"cfg_contrast[{variant}]")
    upstream = {f"activations/{group}": upstream_record["data_version"]}
    out_dir = layout.check_output_folder(layout.stage_dir("cfg_contrast", variant), "cfg_contrast folder")
    run_config = contrast_config.resolved()
    data_version = contrast_config.config_hash() + "-" + upstream_record["data_version"]
    summary = _unchanged(layout, variant, out_dir, contrast_config, data_version)
    reused = summary is not None
    if summary is None:
        summary = compute_cfg_contrast(ActivationStore(layout.activations_dir(group)), variant, out_dir,
                                       contrast_config)
    else:
        context.log.info(f"cfg_contrast[{variant}]: the capture, settings and code are unchanged since the last "
                         "run: its tables are kept")
    write_record(layout.records_dir, make_record(
        "cfg_contrast", variant, CFG_CONTRAST_CODE_VERSION, run_config, upstream, data_version,
        outputs={"dir": layout.relative(out_dir), "halves": summary.halves, "text_driven": summary.text_driven},
    ))
    metadata = {
        "path": path_metadata(out_dir),
        "halves": summary.halves,
        "prompts": summary.n_prompts,
        "channels": summary.width,
        "text_driven": summary.text_driven,
        "text_suppressed": summary.text_suppressed,
        "reused": reused,
        **lineage_metadata(run_config, upstream, CFG_CONTRAST_CODE_VERSION),
    }
    table = None
    if summary.reason:
        metadata["reason"] = summary.reason
    else:
        import polars as pl

        table = pl.read_parquet(out_dir / CHANNELS_FILE)
        strongest = (table.sort("q_value", "channel").head(10)
                     .select("channel", "verdict", "difference", "ci_low", "ci_high", "q_value"))
        metadata["most_text_dependent"] = table_preview(strongest.to_dicts())
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(data_version),
                                check_results=[cfg_contrast_check(table, summary.alpha, summary.halves)])


def _unchanged(layout, variant: str, out_dir, config: CfgContrastConfig, data_version: str):
    """The finished summary when the last run's record has this data version (same capture, same settings) and
    this code version and its tables are whole; ``None``: compute it."""
    try:
        record = read_record(layout.records_dir, "cfg_contrast", variant)
    except (MissingUpstreamError, ValueError, OSError):
        return None
    if record.get("data_version") != data_version or record.get("code_version") != CFG_CONTRAST_CODE_VERSION:
        return None
    return finished_cfg_contrast(out_dir, variant, config)
