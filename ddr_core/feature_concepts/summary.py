"""The summary of a variant's feature-concepts table: purity distributions, significance counts, the
agreement tests and the flat ``figures`` the regression check compares.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from ddr_core.feature_concepts.config import QUANTILES, SOURCES, FeatureConceptsConfig


def distribution(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """``n, mean, std, min, q10, q25, median, q75, q90, max`` of the non-null values (None when empty)."""
    array = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                       dtype=np.float64)
    if array.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, **{k: None for k in QUANTILES}, "max": None}
    return {"n": int(array.size), "mean": float(array.mean()), "std": float(array.std()), "min": float(array.min()),
            **{k: float(np.quantile(array, q)) for k, q in QUANTILES.items()}, "max": float(array.max())}


def _interval(values: Sequence[float], config: FeatureConceptsConfig) -> list[float | None]:
    from ddr_core.concept_stats import bootstrap_interval

    low, high = bootstrap_interval(values, resamples=config.bootstrap_resamples, seed=config.seed)
    return [None if math.isnan(low) else low, None if math.isnan(high) else high]


def _agreement_test(units: list[tuple[list[str], str, str]], reference: dict[str, list[str]],
                    config: FeatureConceptsConfig) -> dict[str, Any]:
    """Rate, per-image chance (over ``reference``: every image of the source, per family), channel-permutation
    p-value and bootstrap interval of (predictions, target, family) units
    (:func:`ddr_core.concept_stats.agreement_permutation_test`)."""
    from ddr_core.concept_stats import agreement_permutation_test

    result = agreement_permutation_test([u[0] for u in units], [u[1] for u in units], strata=[u[2] for u in units],
                                        reference=reference, permutations=config.permutations, seed=config.seed)
    shares = [sum(v == target for v in predicted) / len(predicted) for predicted, target, _ in units if predicted]
    return {"rate": None if math.isnan(result["rate"]) else result["rate"],
            "chance": None if math.isnan(result["chance_per_image"]) else result["chance_per_image"],
            "p_value": None if math.isnan(result["p_value"]) else result["p_value"],
            "p_floor": None if math.isnan(result["p_floor"]) else result["p_floor"],
            "interval": _interval(shares, config), "n_units": result["units"], "images": result["images"]}


def summarise(table: pl.DataFrame, families: Sequence[str], sources: Sequence[str],
              config: FeatureConceptsConfig | None = None, world: dict[str, Any] | None = None,
              predictions: dict[str, pl.DataFrame] | None = None) -> dict[str, Any]:
    """The summary of a :func:`compute_feature_concepts` table (see the module docstring).

    ``predictions``: per source, the per-image predictions (``channel`` + one column per family) the
    agreement tests permute; without them the agreement sections carry rates only.
    """
    config = config or FeatureConceptsConfig()
    scored = table.filter(pl.col("purity").is_not_null())
    purity = {
        "overall": {**distribution(scored["purity"].to_list()), "interval": _interval(scored["purity"].to_list(), config)},
        "joint": distribution(scored["purity_joint"].to_list()),
        "chance": distribution(scored["chance_purity"].to_list()),
        "excess": {**distribution(scored["purity_excess"].to_list()),
                   "interval": _interval(scored["purity_excess"].to_list(), config)},
        "chance_joint": distribution(scored["chance_purity_joint"].to_list()),
        "families": {f: distribution(scored[f"purity_{f}"].to_list()) for f in families},
        "chance_families": {f: distribution(scored[f"chance_purity_{f}"].to_list()) for f in families},
    }
    selective = scored.filter(pl.col("n_concepts") > 0)
    significance = {
        "alpha": config.alpha, "tests": int(sum(scored[f"p_{f}"].is_not_null().sum() for f in families)),
        "channels_scored": scored.height, "selective_channels": selective.height,
        "share": selective.height / scored.height if scored.height else None,
        "share_interval": _interval([float(n > 0) for n in scored["n_concepts"].to_list()], config),
        "families": {f: {"channels": int((scored[f"q_{f}"] < config.alpha).sum()),
                         "values": dict(sorted(Counter(scored.filter(pl.col(f"q_{f}") < config.alpha)
                                                       [f"dominant_{f}"].to_list()).items())),
                         "min_p": (float(scored[f"p_{f}"].min()) if scored[f"p_{f}"].is_not_null().any() else None)}
                     for f in families},
    }
    dominant_counts = {f: dict(sorted(Counter(scored[f"dominant_{f}"].to_list()).items())) for f in families}
    agreement: dict[str, Any] = {}
    for source in sources:
        if f"n_{source}_images" not in table.columns:
            continue
        with_images = table.filter((pl.col(f"n_{source}_images") > 0) & pl.col("purity").is_not_null())
        frame = (predictions or {}).get(source)
        images = ({int(key[0]): group for key, group in frame.group_by("channel")} if frame is not None else {})
        reference = {family: frame[family].to_list() for family in families} if frame is not None else {}
        per_family, selective_units = {}, []
        for family in families:
            rates = with_images[f"{source}_agreement_{family}"].drop_nulls()
            units, significant = [], []
            for row in with_images.iter_rows(named=True):
                group = images.get(int(row["channel"]))
                if group is None or row[f"dominant_{family}"] is None:
                    continue
                unit = (group[family].to_list(), row[f"dominant_{family}"], family)
                units.append(unit)
                if row[f"q_{family}"] is not None and row[f"q_{family}"] < config.alpha:
                    significant.append(unit)
            selective_units += significant
            per_family[family] = {"rate": float(rates.mean()) if rates.len() else None,
                                  "n_channels": int(rates.len()),
                                  **({"test": _agreement_test(units, reference, config),
                                      "significant": _agreement_test(significant, reference, config)}
                                     if frame is not None else {})}
            per_family[family]["chance"] = (per_family[family].get("test") or {}).get("chance")
        overall = with_images[f"{source}_agreement"].drop_nulls()
        section: dict[str, Any] = {"families": per_family, "rate": float(overall.mean()) if overall.len() else None,
                                   "n_channels": int(overall.len()),
                                   "images": int(with_images[f"n_{source}_images"].sum() or 0)}
        if frame is not None:
            test = _agreement_test(selective_units, reference, config)
            section["selective"] = {**test, "definition": f"channel x family pairs with q < {config.alpha:g}"}
        agreement[source] = section
    counts = {"channels": table.height, "with_examples": int((table["n_examples"] > 0).sum()),
              "with_purity": scored.height,
              "without_enough_examples": int(((table["n_examples"] > 0) & table["purity"].is_null()).sum())}
    for source in agreement:
        counts[f"with_{source}_images"] = int((table[f"n_{source}_images"] > 0).sum())
    summary = {"counts": counts, "purity": purity, "significance": significance, "agreement": agreement,
               "dominant_counts": dominant_counts,
               "figures": figures_of(purity, agreement, families, world, significance)}
    if world is not None:
        summary["world"] = world
    return summary


def figures_of(purity: dict[str, Any], agreement: dict[str, Any], families: Sequence[str],
               world: dict[str, Any] | None = None, significance: dict[str, Any] | None = None) -> dict[str, float]:
    """The flat, higher-is-better numbers of a summary (what the baseline check compares)."""
    figures: dict[str, float | None] = {
        "purity_mean": purity["overall"]["mean"], "purity_median": purity["overall"]["median"],
        "purity_joint_mean": purity["joint"]["mean"], "purity_excess_mean": purity["excess"]["mean"],
        **{f"purity_{f}_mean": purity["families"][f]["mean"] for f in families},
    }
    if significance is not None:
        figures["selective_share"] = significance["share"]
    for source, section in agreement.items():
        figures[f"{source}_agreement"] = section["rate"]
        figures[f"{source}_agreement_selective"] = (section.get("selective") or {}).get("rate")
        for family, values in section["families"].items():
            figures[f"{source}_agreement_{family}"] = values["rate"]
    for source, values in ((world or {}).get("sources") or {}).items():
        figures[f"{source}_recognisable"] = values["recognisable"]
    return {name: round(float(value), 6) for name, value in figures.items() if value is not None}


def table_columns(families: Sequence[str], sources: Sequence[str] = SOURCES, world: bool = False) -> list[str]:
    """Columns of ``feature_concepts.parquet`` in order (``world``: with the recognisability columns)."""
    columns = ["channel", "basis", "n_examples", "n_labelled", "examples_timestep", "concept", "n_concepts",
               "purity", "chance_purity", "purity_excess", "purity_joint", "chance_purity_joint"]
    for family in families:
        columns += [f"dominant_{family}", f"purity_{family}", f"chance_purity_{family}", f"p_{family}",
                    f"q_{family}"]
    for source in sources:
        columns += [f"n_{source}_images", f"{source}_agreement", f"{source}_agreement_selective"]
        if world:
            columns += [f"{source}_world_rmse", f"{source}_recognisable"]
        for family in families:
            columns += [f"{source}_agreement_{family}", f"{source}_vote_{family}"]
    return columns
