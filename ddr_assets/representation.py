"""``representation_shards`` (per channel block) and ``html_export`` (per variant): what researchers look at."""

import dagster as dg

from ddr_assets.blocks import BlockRun, ChannelBlockStage, VariantWork, channel_block_asset
from ddr_assets.lineage import lineage_metadata, path_metadata, require_upstream
from ddr_assets.partitions import block_to_variant_mapping, variant_partitions, variant_to_blocks_mapping
from ddr_core.config import config_hash
from ddr_core.html_export import write_html_report
from ddr_core.records import make_record, read_record, write_record
from ddr_core.representation import representation_for_variant
from ddr_resources.resources import DdrStorage

REPRESENTATION_CODE_VERSION = "1"


def _optional_record(layout, asset: str, key: str) -> str | None:
    try:
        return read_record(layout.records_dir, asset, key)["data_version"]
    except Exception:
        return None


def _representation_variant(run: BlockRun, variant: str, blocks: dict[str, list[int]]) -> VariantWork:
    layout = run.layout
    require_upstream(run.storage, "representation_shards", list(blocks))
    stats = read_record(layout.records_dir, "timestep_stats", variant,
                        required_by=f"representation_shards[{next(iter(blocks))}]")
    upstream = {f"timestep_stats/{variant}": stats["data_version"]}
    for key in blocks:  # priors and dreams are optional: a shard shows what exists
        for asset in ("priors", "dreams", "dreams_no_noise"):
            version = _optional_record(layout, asset, key)
            if version:
                upstream[f"{asset}/{key}"] = version
    channels = [c for chans in blocks.values() for c in chans]
    summary, index_path = representation_for_variant(layout, variant, channels, log=run.context.log.info,
                                                     lock_owner=f"dagster run {run.context.run_id}")
    if summary.n_errors:
        run.context.log.warning(f"{summary.n_errors} missing/unsafe file reference(s) in {variant} shards: "
                                f"{list(summary.errors.items())[:3]}")
    return VariantWork(upstream=upstream, config={}, outputs={"dir": summary.out_dir, "errors": summary.n_errors},
                       extra={"summary": summary, "index": index_path})


def _representation_finish(run: BlockRun, works: list[VariantWork]) -> tuple[dict, list]:
    summaries = [w.extra["summary"] for w in works]
    return {
        "shards": sum(len(s.channels) for s in summaries),
        "active": sum(len(s.active_channels) for s in summaries),
        "with_priors": sum(len(s.with_priors) for s in summaries),
        "with_dreams": sum(len(s.with_dreams.get("noise", [])) for s in summaries),
        "file_errors": sum(s.n_errors for s in summaries),
        "index": path_metadata(works[0].extra["index"]) if works else "",
    }, []


representation_shards = channel_block_asset(ChannelBlockStage(
    name="representation_shards",
    description="One shard per channel (activity curves, peaks, dataset examples, priors, dreams and their "
                "steps, quality; relative paths only) and a DuckDB-queryable index per variant.",
    group_name="representation", code_version=REPRESENTATION_CODE_VERSION, kinds=frozenset({"json", "parquet"}),
    run_variant=_representation_variant, finish=_representation_finish,
    deps=(dg.AssetDep("timestep_stats", partition_mapping=block_to_variant_mapping()),
          dg.AssetDep("priors"), dg.AssetDep("dreams"), dg.AssetDep("dreams_no_noise")),
    lineage_config=lambda run, works: {},
))


@dg.asset(
    partitions_def=variant_partitions(),
    deps=[dg.AssetDep("representation_shards", partition_mapping=variant_to_blocks_mapping())],
    group_name="representation",
    code_version=REPRESENTATION_CODE_VERSION,
    kinds={"html"},
    description="A self-contained HTML report of a variant (index with a sortable channel table, a page per "
                "channel with charts, examples, priors and dreams; the ground truth where feature_concepts "
                "scored the variant) that opens from disk with no server.",
)
def html_export(context: dg.AssetExecutionContext, storage: DdrStorage) -> dg.MaterializeResult:
    variant = context.partition_key
    layout = storage.layout
    require_upstream(storage, "html_export", variant)
    stats = read_record(layout.records_dir, "timestep_stats", variant, required_by=f"html_export[{variant}]")
    out_dir = layout.check_output_folder(layout.stage_dir("html_export", variant), "report folder")
    report = write_html_report(layout, variant, out_dir)
    index = report.index
    pages = len(list((out_dir / "channels").glob("*.html")))
    context.log.info(f"HTML report of {variant}: open {index} in a browser")
    if report.problems:
        context.log.warning(f"{len(report.problems)} problem(s) in the HTML report of {variant} (listed at the top "
                            f"of {index}): " + "; ".join(p.text() for p in report.problems[:5]))
    upstream = {f"timestep_stats/{variant}": stats["data_version"]}
    write_record(layout.records_dir, make_record("html_export", variant, REPRESENTATION_CODE_VERSION, {}, upstream,
                                                 config_hash(upstream), outputs={"index": layout.relative(index)}))
    return dg.MaterializeResult(metadata={
        "index_html": path_metadata(index),
        "channel_pages": pages,
        "problems": len(report.problems),
        "open_with": f"file://{index}",
        **lineage_metadata({}, upstream, REPRESENTATION_CODE_VERSION),
    }, data_version=dg.DataVersion(config_hash(upstream)))
