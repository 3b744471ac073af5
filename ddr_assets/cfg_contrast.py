"""``cfg_contrast``: per channel, the conditional vs the unconditional CFG half (which features the text drives).

Partitioned by variant like ``timestep_stats`` and downstream of the same capture; it reads the store's two
halves batch by batch (:func:`ddr_core.cfg_contrast.compute_cfg_contrast`). A guidance-free capture gives a
summary saying there is one half and no tables.
"""

import dagster as dg

from ddr_assets.configs import dagster_config_from
from ddr_assets.lineage import lineage_metadata, path_metadata, require_upstream, table_preview
from ddr_assets.partitions import variant_partitions, variant_to_capture_mapping
from ddr_core.activation_store import ActivationStore
from ddr_core.cfg_contrast import CHANNELS_FILE, CfgContrastConfig, compute_cfg_contrast
from ddr_core.records import make_record, read_record, write_record
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
    summary = compute_cfg_contrast(ActivationStore(layout.activations_dir(group)), variant, out_dir, contrast_config)
    run_config = contrast_config.resolved()
    data_version = summary.config_hash + "-" + upstream_record["data_version"]
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
        **lineage_metadata(run_config, upstream, CFG_CONTRAST_CODE_VERSION),
    }
    if summary.reason:
        metadata["reason"] = summary.reason
    else:
        import polars as pl

        strongest = (pl.read_parquet(out_dir / CHANNELS_FILE).sort("q_value", "channel").head(10)
                     .select("channel", "verdict", "difference", "ci_low", "ci_high", "q_value"))
        metadata["most_text_dependent"] = table_preview(strongest.to_dicts())
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(data_version))
