"""``feature_concepts``: ground-truth concept scores per variant (toy world): purity of each channel's top
dataset examples, agreement of its priors and dreams (per family and on the channel's own concepts), how
recognisable they are (distance to the renders of the model's world), raw vs SAE, and a regression check
against the committed baseline (``config/feature_concepts_baseline.json``).

Partitioned by the variants whose prompt dataset declares concept ``labels``; reads the variant's
timestep statistics and whatever priors / dreams its channel blocks have (a partial run scores the
channels that exist). The work is :func:`ddr_core.feature_concepts.feature_concepts_for_variant`.
"""


from pathlib import Path

import dagster as dg
from pydantic import Field

from ddr_assets.configs import dagster_config_from, to_core
from ddr_assets.lineage import (
    lineage_metadata,
    optional_data_version,
    path_metadata,
    require_upstream,
    stats_upstream,
)
from ddr_assets.partitions import block_keys, parse_block_key, project
from ddr_core.config import PROJECT_ROOT, config_hash
from ddr_core.feature_concepts import (
    DEFAULT_BASELINE_PATH,
    TABLE_FILE,
    FeatureConceptsConfig,
    check_against_baseline,
    compare_bases,
    feature_concepts_dir,
    feature_concepts_for_variant,
    load_baseline,
    markdown_table,
    read_feature_concepts,
)
from ddr_core.records import make_record, write_record
from ddr_resources.resources import DdrStorage

FEATURE_CONCEPTS_CODE_VERSION = "2"
CHECK_NAME = "feature_concepts_baseline"

FeatureConceptsRunConfig = dagster_config_from(FeatureConceptsConfig, "FeatureConceptsRunConfig", extra={
    "baseline_path": (str, Field(str(DEFAULT_BASELINE_PATH.relative_to(PROJECT_ROOT)),
                                 description="baseline JSON (relative: to the project root)")),
    "baseline_tolerance": (float | None, Field(None, ge=0.0,
                                               description="allowed drop of every figure; None: the baseline's")),
})


def labelled_variant_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(project().labelled_variants())


def labelled_variant_identity_mapping() -> dg.StaticPartitionMapping:
    """upstream variant (timestep_stats) -> the same labelled variant."""
    return dg.StaticPartitionMapping({variant: variant for variant in project().labelled_variants()})


def labelled_blocks_to_variant_mapping() -> dg.StaticPartitionMapping:
    """upstream channel block (priors, dreams) -> its variant, for the labelled variants only."""
    labelled = set(project().labelled_variants())
    return dg.StaticPartitionMapping({key: parse_block_key(key)[0] for key in block_keys()
                                      if parse_block_key(key)[0] in labelled})


@dg.asset(
    partitions_def=labelled_variant_partitions(),
    deps=[dg.AssetDep("timestep_stats", partition_mapping=labelled_variant_identity_mapping()),
          dg.AssetDep("priors", partition_mapping=labelled_blocks_to_variant_mapping()),
          dg.AssetDep("dreams", partition_mapping=labelled_blocks_to_variant_mapping())],
    group_name="ground_truth",
    code_version=FEATURE_CONCEPTS_CODE_VERSION,
    kinds={"parquet", "pytorch"},
    check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset="feature_concepts",
                                   description="no figure (purity, prior / dream agreement, recognisability) dropped below the "
                                               "committed baseline by more than its tolerance")],
    description="Per channel / SAE feature of a variant with labelled prompts: concept purity of its top prompts "
                "(dominant colour / shape / background) against the exact null of labels permuted among prompts, "
                "a BH-corrected verdict (selective for X, or not), and whether its priors and dreams show that "
                "concept (classifier agreement vs per-image chance, channel-permutation p-values, bootstrap "
                "intervals) and look like the world at all (recognisable); purity raw vs SAE.",
)
def feature_concepts(context: dg.AssetExecutionContext, config: FeatureConceptsRunConfig,
                     storage: DdrStorage) -> dg.MaterializeResult:
    variant = context.partition_key
    core_config = to_core(config, FeatureConceptsConfig, asset="feature_concepts")
    layout, cfg = storage.layout, storage.project
    require_upstream(storage, "feature_concepts", variant)
    upstream = stats_upstream(layout.records_dir, variant, f"feature_concepts[{variant}]")
    for key in (k for k in block_keys() if parse_block_key(k)[0] == variant):
        for asset in ("priors", "dreams"):
            version = optional_data_version(layout.records_dir, asset, key)
            if version:
                upstream[f"{asset}/{key}"] = version
    result = feature_concepts_for_variant(cfg, layout, variant, core_config, log=context.log.info)
    summary = result.summary

    siblings = {variant: summary}
    for other in cfg.capture_groups()[cfg.capture_of(variant)]:
        if other != variant and other in cfg.labelled_variants():
            found = read_feature_concepts(feature_concepts_dir(layout, other))
            if found is not None:
                siblings[other] = found[1]
    comparison = compare_bases(dict(sorted(siblings.items())))

    baseline_path = Path(config.baseline_path)
    baseline_path = baseline_path if baseline_path.is_absolute() else PROJECT_ROOT / baseline_path
    try:
        check = check_against_baseline(summary["figures"], load_baseline(baseline_path), variant,
                                       config.baseline_tolerance)
    except (FileNotFoundError, ValueError) as error:
        check = {"passed": False, "description": str(error), "compared": {}, "regressions": [],
                 "has_baseline": False}

    run_config = {**core_config.model_dump(mode="json"), "baseline_path": config.baseline_path,
                  "baseline_tolerance": config.baseline_tolerance}
    data_version = config_hash({"config": core_config.config_hash(), "upstream": upstream})
    write_record(layout.records_dir, make_record(
        "feature_concepts", variant, FEATURE_CONCEPTS_CODE_VERSION, run_config, upstream, data_version,
        outputs={"dir": layout.relative(result.out_dir), "figures": summary["figures"]},
    ))
    purity = summary["purity"]
    agreement_rows = []
    for source, section in summary["agreement"].items():
        for family, values in section["families"].items():
            for scope in ("test", "significant"):
                test = values.get(scope) or {}
                agreement_rows.append({"source": source, "family": family,
                                       "channels": "all scored" if scope == "test" else "selective (q < alpha)",
                                       "rate": test.get("rate"), "interval": _interval_text(test.get("interval")),
                                       "chance per image": test.get("chance"), "p": test.get("p_value"),
                                       "n": test.get("n_units")})
        if section.get("selective"):
            test = section["selective"]
            agreement_rows.append({"source": source, "family": "pooled", "channels": test["definition"],
                                   "rate": test.get("rate"), "interval": _interval_text(test.get("interval")),
                                   "chance per image": test.get("chance"), "p": test.get("p_value"),
                                   "n": test.get("n_units")})
    significance = summary.get("significance") or {}
    return dg.MaterializeResult(
        metadata={
            "path": path_metadata(result.out_dir),
            "table": path_metadata(result.out_dir / TABLE_FILE),
            "basis": summary["basis"],
            "channels": summary["counts"]["channels"],
            "channels_scored": summary["counts"]["with_purity"],
            "channels_with_prior_images": summary["counts"].get("with_prior_images", 0),
            "channels_with_dream_images": summary["counts"].get("with_dream_images", 0),
            "selective_channels": int(significance.get("selective_channels", 0)),
            "selective_by_family": dg.MetadataValue.json(significance.get("families", {})),
            **_numbers({"purity_mean": purity["overall"]["mean"], "purity_median": purity["overall"]["median"],
                        "chance_purity_mean": purity["chance"]["mean"],
                        "prior_agreement": (summary["agreement"].get("prior") or {}).get("rate"),
                        "dream_agreement": (summary["agreement"].get("dream") or {}).get("rate"),
                        **{f"{source}_agreement_selective": (section.get("selective") or {}).get("rate")
                           for source, section in summary["agreement"].items()},
                        **{f"{source}_recognisable": values["recognisable"]
                           for source, values in (summary.get("world") or {}).get("sources", {}).items()},
                        "generations_recognisable": ((summary.get("world") or {}).get("generations") or {})
                        .get("recognisable")}),
            "purity_raw_vs_sae": dg.MetadataValue.md(markdown_table(comparison)),
            "agreement": dg.MetadataValue.md(markdown_table(agreement_rows)),
            "figures": dg.MetadataValue.json(summary["figures"]),
            **lineage_metadata(run_config, upstream, FEATURE_CONCEPTS_CODE_VERSION),
        },
        data_version=dg.DataVersion(data_version),
        check_results=[dg.AssetCheckResult(
            check_name=CHECK_NAME, passed=bool(check["passed"]), description=check["description"],
            metadata={"compared": dg.MetadataValue.json(check["compared"]),
                      "regressed": dg.MetadataValue.json([r["figure"] for r in check["regressions"]]),
                      "has_baseline": bool(check.get("has_baseline")),
                      "baseline": str(baseline_path)},
        )],
    )


def _interval_text(values: list[float | None] | None) -> str | None:
    return None if not values or values[0] is None else f"[{values[0]:.3f}, {values[1]:.3f}]"


def _numbers(values: dict[str, float | None]) -> dict[str, float]:
    """The measured ones, rounded (a figure that was not measured is left out of the metadata)."""
    return {name: round(float(value), 4) for name, value in values.items() if value is not None}
