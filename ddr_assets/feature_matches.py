"""``feature_matches``: which features of variant A are which features of variant B, and which have no match.

Partitioned by configured comparison (``comparisons:`` in the project config, ``<variant A>__<variant B>``) and
downstream of both variants' captures; the compute is :mod:`ddr_core.feature_matching_stage` (docs/MATCHING.md).
The run config's settings win over the comparison's ``matching`` defaults (a field left unset keeps them).
"""

from typing import Any

import dagster as dg
from pydantic import Field, create_model

from ddr_assets.lineage import lineage_metadata, path_metadata, require_upstream, table_preview
from ddr_assets.partitions import comparison_partitions, comparison_to_capture_mapping
from ddr_core.comparisons import parse_comparison_name
from ddr_core.feature_matching import MatchingConfig
from ddr_core.feature_matching_stage import (
    CaptureMismatchError,
    feature_matches_for_comparison,
    matching_config,
)
from ddr_core.records import make_record, read_record, write_record
from ddr_resources.resources import DdrStorage

FEATURE_MATCHES_CODE_VERSION = "1"
FeatureMatchesRunConfig = create_model(
    "FeatureMatchesRunConfig", __base__=dg.Config, __doc__=MatchingConfig.__doc__,
    **{name: (info.annotation | None, Field(None, description=f"{info.description} (unset: the comparison's "
                                                            f"default, else {info.default!r})"))
       for name, info in MatchingConfig.model_fields.items()},
)
FeatureMatchesRunConfig.__module__ = __name__


@dg.asset(
    partitions_def=comparison_partitions(),
    deps=[dg.AssetDep("activations", partition_mapping=comparison_to_capture_mapping())],
    group_name="comparisons",
    code_version=FEATURE_MATCHES_CODE_VERSION,
    kinds={"polars", "parquet"},
    description="Feature matching of two variants over the same captured generations: best match and Hungarian "
                "pairs by activation correlation (and by direction where both live in one space), features with no "
                "match better than a prompt-shuffle null (vanished / appeared), and which concepts those are.",
)
def feature_matches(context: dg.AssetExecutionContext, config: FeatureMatchesRunConfig,  # type: ignore[valid-type]
                    storage: DdrStorage) -> dg.MaterializeResult:
    name = context.partition_key
    project, layout = storage.project, storage.layout
    a, b = parse_comparison_name(name)
    groups = list(dict.fromkeys(project.capture_of(v) for v in (a, b)))
    require_upstream(storage, "feature_matches", name)
    records = {g: read_record(layout.records_dir, "activations", g, required_by=f"feature_matches[{name}]")
               for g in groups}
    upstream = {f"activations/{g}": r["data_version"] for g, r in records.items()}
    settings = matching_config(project, name, {k: v for k, v in config.model_dump().items() if v is not None})
    out_dir = layout.check_output_folder(layout.stage_dir("feature_matches", name), "feature_matches folder")
    try:
        summary = feature_matches_for_comparison(project, layout, name, out_dir, settings, log=context.log.info)
    except CaptureMismatchError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    run_config = {**settings.model_dump(), "version": summary["version"]}
    from ddr_core.config import config_hash

    data_version = config_hash(run_config)[:16] + "-" + "-".join(r["data_version"] for r in records.values())
    write_record(layout.records_dir, make_record(
        "feature_matches", name, FEATURE_MATCHES_CODE_VERSION, run_config, upstream, data_version,
        outputs={"dir": layout.relative(out_dir), "counts_a": summary["counts_a"], "counts_b": summary["counts_b"]},
    ))
    return dg.MaterializeResult(metadata=_metadata(out_dir, summary, settings, run_config, upstream),
                                data_version=dg.DataVersion(data_version))


def _metadata(out_dir: Any, summary: dict[str, Any], settings: MatchingConfig, run_config: dict[str, Any],
              upstream: dict[str, str]) -> dict[str, Any]:
    import polars as pl

    from ddr_core.feature_matching_stage import A_FILE, CONCEPTS_FILE, PAIRS_FILE

    a, b = summary["a"], summary["b"]
    pairs = pl.read_parquet(out_dir / PAIRS_FILE).head(settings.table_rows)
    metadata: dict[str, Any] = {
        "path": path_metadata(out_dir),
        "variants": f"A = {a}, B = {b}",
        "generations": summary["generations"], "timesteps": summary["timesteps"], "prompts": summary["prompts"],
        "matched_a": summary["counts_a"]["matched"], "vanished_a": summary["counts_a"]["vanished"],
        "silent_a": summary["counts_a"]["silent"],
        "matched_b": summary["counts_b"]["matched"], "appeared_b": summary["counts_b"]["appeared"],
        "silent_b": summary["counts_b"]["silent"],
        "null_threshold": dg.MetadataValue.float(float(summary["null_pooled_threshold"])),
        "hungarian_pairs": dg.MetadataValue.md(f"{summary['hungarian_pairs']} pairs, mean score "
                                               f"{summary['hungarian_mean_score'] or 0:.3f}"),
        "top_pairs": table_preview([{"A": r["a"], "B": r["b"], "r": round(r["r"], 3), "A status": r["a_status"],
                                     "B status": r["b_status"]} for r in pairs.to_dicts()], settings.table_rows),
        **lineage_metadata(run_config, upstream, FEATURE_MATCHES_CODE_VERSION),
    }
    vanished = pl.read_parquet(out_dir / A_FILE).filter(pl.col("status") == "vanished").sort("score")
    metadata["vanished"] = table_preview([{"A feature": r["feature"], "best B": r["best"], "r": round(r["r"], 3),
                                           "null threshold": round(r["null_threshold"], 3),
                                           "p": round(r["p_value"], 4)} for r in vanished.to_dicts()],
                                         settings.table_rows)
    if summary.get("directions"):
        metadata["directions_above_chance_a"] = summary["directions"]["above_chance_a"]
    if summary.get("concepts") and (out_dir / CONCEPTS_FILE).is_file():
        concepts = pl.read_parquet(out_dir / CONCEPTS_FILE).sort("fisher_p", nulls_last=True)
        metadata["concepts"] = table_preview([
            {"family": r["family"], "value": r["value"], "selective": r["n_selective"], "vanished": r["n_vanished"],
             "chance": round(r["expected_vanished"], 2), "Fisher p": r["fisher_p"], "q": r["fisher_q"]}
            for r in concepts.to_dicts()], settings.table_rows)
    return metadata
