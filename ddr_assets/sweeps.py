"""``dream_sweeps``: a grid of dream hyperparameters on a few channels, compared in one table.

Not partitioned: the run config names the variant, the channels, the grid and the sweep's name;
each sweep writes its own folder ``dream_sweeps/<name>/<variant>/`` (never the ``dreams`` folder)
and resumes per setting. See :mod:`ddr_core.sweeps`.
"""

import dagster as dg

from ddr_assets.activations import image_preview
from ddr_assets.configs import dagster_config_from, to_core
from ddr_assets.lineage import lineage_metadata, path_metadata, table_preview
from ddr_assets.partitions import block_key
from ddr_core.config import config_hash
from ddr_core.records import make_record, read_record, write_record
from ddr_core.sweeps import SweepConfig, run_sweep
from ddr_resources.resources import ComputeResource, DdrStorage

DREAM_SWEEPS_CODE_VERSION = "1"
DreamSweepsConfig = dagster_config_from(SweepConfig, "DreamSweepsConfig")


def _blocks_of(project, variant: str, channels: list[int]) -> list[str]:
    """The channel-block keys holding ``channels`` (their priors records are the upstream)."""
    keys = []
    for first, last in project.variants[variant].channel_blocks():
        if any(first <= c <= last for c in channels):
            keys.append(block_key(variant, first, last))
    return keys


@dg.asset(
    deps=[dg.AssetDep("timestep_stats"), dg.AssetDep("priors")],
    group_name="priors_and_dreams",
    code_version=DREAM_SWEEPS_CODE_VERSION,
    kinds={"pytorch", "parquet", "duckdb"},
    pool="gpu",
    description="A grid of dream hyperparameters (e.g. learning rate x TV weight) on a few channels, written "
                "apart from `dreams`: comparison.parquet / comparison.duckdb and a contact sheet per channel.",
)
def dream_sweeps(context: dg.AssetExecutionContext, config: DreamSweepsConfig, storage: DdrStorage,
                 compute: ComputeResource) -> dg.MaterializeResult:
    sweep = to_core(config, SweepConfig, asset="dream_sweeps")
    layout, project = storage.layout, storage.project
    if sweep.variant not in project.variants:
        raise dg.Failure(description=f"dream_sweeps: unknown variant {sweep.variant!r}; "
                                     f"known: {sorted(project.variants)}")
    required_by = f"dream_sweeps[{sweep.name}]"
    stats = read_record(layout.records_dir, "timestep_stats", sweep.variant, required_by=required_by)
    upstream = {f"timestep_stats/{sweep.variant}": stats["data_version"]}
    overrides = project.variants[sweep.variant].overrides.get("dreams", {})
    if any(setting.start_from == "prior" for setting in sweep.settings(overrides)):
        for key in _blocks_of(project, sweep.variant, sweep.channels):
            upstream[f"priors/{key}"] = read_record(layout.records_dir, "priors", key,
                                                    required_by=required_by)["data_version"]
    result = run_sweep(project, layout, sweep, compute.torch_device(), log=context.log.info)
    run_config = sweep.model_dump(mode="json")
    write_record(layout.records_dir, make_record(
        "dream_sweeps", f"{sweep.variant}:{sweep.name}", DREAM_SWEEPS_CODE_VERSION, run_config, upstream,
        data_version=config_hash({"config": run_config, "upstream": upstream}),
        outputs={"dir": layout.relative(result.root), "settings": len(result.settings)},
    ))
    summary = result.summary().select(
        [c for c in ("setting", "label", "mean_final_activation", "mean_ratio", "failed", "dreams")
         if c in result.summary().columns]
    ).to_dicts()
    return dg.MaterializeResult(
        metadata={
            "settings": len(result.settings),
            "settings_run": len(result.settings_run),
            "settings_resumed": len(result.settings_skipped),
            "dreams": result.comparison.height if result.comparison is not None else 0,
            "summary": table_preview(summary, limit=50),
            "contact_sheets": image_preview(list(result.contact_sheets.values()), size=512),
            "comparison": path_metadata(result.comparison_path),
            "duckdb": path_metadata(result.database_path),
            **lineage_metadata(run_config, upstream, DREAM_SWEEPS_CODE_VERSION),
        },
    )
