"""``feature_labels``: an automatic label per channel / SAE feature of a variant from its top dataset examples, with
its held-out detection score (balanced accuracy, chance 0.5, exact prompt-permutation p-value, BH, bootstrap
interval over prompts) and, on the toy world, whether the label is the feature's significant concept.

Partitioned by the variants whose model names a ``labeller`` (``models.<m>.labeller`` in the project config); reads
the variant's timestep statistics, the capture's images and, where it exists, the variant's ``feature_concepts``
verdicts. The work is :func:`ddr_core.labels.feature_labels_for_variant`; docs/LABELS.md explains the score.
"""

import dagster as dg

from ddr_assets.configs import dagster_config_from, to_core
from ddr_assets.lineage import (
    content_version,
    lineage_metadata,
    optional_data_version,
    path_metadata,
    require_upstream,
    stats_upstream,
    table_preview,
)
from ddr_assets.partitions import project
from ddr_core.config import config_hash
from ddr_core.feature_concepts import TABLE_FILE as CONCEPTS_TABLE_FILE
from ddr_core.feature_concepts import feature_concepts_dir
from ddr_core.labels import TABLE_FILE, FeatureLabelsConfig, feature_labels_for_variant
from ddr_core.records import make_record, write_record
from ddr_resources.resources import DdrStorage

FEATURE_LABELS_CODE_VERSION = "1"
FeatureLabelsRunConfig = dagster_config_from(FeatureLabelsConfig, "FeatureLabelsRunConfig")


def labeller_variant_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(project().labeller_variants())


def _identity(variants: list[str]) -> dg.StaticPartitionMapping:
    return dg.StaticPartitionMapping({variant: variant for variant in variants})


def _interval(low: float | None, high: float | None) -> str | None:
    return None if low is None or high is None else f"[{low:.2f}, {high:.2f}]"


@dg.asset(
    partitions_def=labeller_variant_partitions(),
    deps=[dg.AssetDep("timestep_stats", partition_mapping=_identity(project().labeller_variants())),
          dg.AssetDep("feature_concepts", partition_mapping=_identity(
              [v for v in project().labeller_variants() if v in project().labelled_variants()]))],
    group_name="ground_truth",
    code_version=FEATURE_LABELS_CODE_VERSION,
    kinds={"parquet", "pytorch"},
    description="Per channel / SAE feature: a label from its top dataset examples (the model's labeller: its concept "
                "classifier on the toy world, zero-shot CLIP elsewhere) and how well that label picks its held-out "
                "top examples out of hard and easy negatives (balanced accuracy, chance 0.5, exact prompt-permutation "
                "p, BH, bootstrap interval); on the toy world, whether the label is the feature's significant concept.",
)
def feature_labels(context: dg.AssetExecutionContext, config: FeatureLabelsRunConfig,
                   storage: DdrStorage) -> dg.MaterializeResult:
    variant = context.partition_key
    core = to_core(config, FeatureLabelsConfig, asset="feature_labels")
    layout, cfg = storage.layout, storage.project
    require_upstream(storage, "feature_labels", variant)
    upstream = stats_upstream(layout.records_dir, variant, f"feature_labels[{variant}]")
    concepts = feature_concepts_dir(layout, variant)
    if concepts.is_dir():  # else not scored at all: the labels are made, unchecked
        version = optional_data_version(layout.records_dir, "feature_concepts", variant)
        if version is None and (concepts / CONCEPTS_TABLE_FILE).is_file():  # scored by hand: still read
            version = content_version(concepts / CONCEPTS_TABLE_FILE)
        if version is not None:
            upstream[f"feature_concepts/{variant}"] = version
    table, summary, out = feature_labels_for_variant(cfg, layout, variant, core, log=context.log.info)
    run_config = core.model_dump(mode="json")
    data_version = config_hash({"config": core.config_hash(), "upstream": upstream,
                                "labeller": summary["labeller"]})
    write_record(layout.records_dir, make_record(
        "feature_labels", variant, FEATURE_LABELS_CODE_VERSION, run_config, upstream, data_version,
        outputs={"dir": layout.relative(out), "scored": summary["scored"], "significant": summary["significant"]},
    ))
    rows = [{"feature": r["channel"], "label": r["label"], "score": r["score"],
             "95% interval": _interval(r["score_low"], r["score_high"]), "q": r["q_value"],
             "significant": r["significant"], "concept (truth)": r["concept"], "matches": r["label_matches"]}
            for r in table.sort("score", descending=True, nulls_last=True).iter_rows(named=True)]
    truth = summary.get("truth") or {}
    match = truth.get("match") or {}
    numbers = {"score_mean": summary["score_mean"], "score_median": summary["score_median"],
               "tnr_hard_mean": summary["tnr_hard_mean"], "tnr_easy_mean": summary["tnr_easy_mean"],
               "label_matches_concept": match.get("rate"), "label_matches_chance": match.get("chance"),
               "label_matches_p": match.get("p_value")}
    return dg.MaterializeResult(
        metadata={
            "path": path_metadata(out),
            "table": path_metadata(out / TABLE_FILE),
            "labeller": f"{summary['labeller']} ({summary['labeller_kind']})",
            "features": summary["channels"],
            "features_scored": summary["scored"],
            "features_significant": summary["significant"],
            "chance": summary["chance"],
            "score_interval": str(_interval(*summary["score_interval"])),
            **{k: round(float(v), 4) for k, v in numbers.items() if v is not None},
            "labels": table_preview(rows, limit=30),
            "seconds": summary["seconds"],
            **lineage_metadata(run_config, upstream, FEATURE_LABELS_CODE_VERSION),
        },
        data_version=dg.DataVersion(data_version),
    )
