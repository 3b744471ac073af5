"""Labels and detection scores of every feature of a variant (:func:`label_features`), their summary, and the
output folder (:func:`write_feature_labels`, :func:`read_feature_labels`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from ddr_core.config import config_hash
from ddr_core.labels.detection import CHANCE, choose_negatives, detection_test, split_by_prompt

FORMAT = "ddr.feature_labels/1"
TABLE_FILE = "feature_labels.parquet"
SUMMARY_FILE = "summary.json"
LogFn = Callable[[str], None]


class FeatureLabelsConfig(BaseModel):
    """Parameters of :func:`label_features`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_top: int = Field(10, ge=4, description="top prompts per feature, split by prompt into a labelling and a "
                                             "held-out half")
    negatives_per_positive: int = Field(2, ge=1, description="held-out negative prompts per held-out positive")
    negative_quantile: float = Field(0.5, gt=0.0, le=1.0,
                                     description="negatives come from the prompts whose activation is at most "
                                                 "this quantile of the feature's per-prompt activations")
    hard_share: float = Field(0.5, ge=0.0, le=1.0,
                              description="share of hard negatives: prompts that share all but one concept value "
                                          "with a held-out positive (labelled prompts), else the highest activators "
                                          "of the negative pool")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="false discovery rate of the per-feature detection tests")
    permutations: int = Field(2000, ge=100, description="label permutations among channels of the label-matches-"
                                                        "concept test (each feature's own null is exact)")
    bootstrap_resamples: int = Field(1000, ge=100, description="resamples of the bootstrap intervals")
    seed: int = Field(0, ge=0, description="seed of the splits, negatives, permutations and resamples")
    memory_budget_mib: int = Field(
        4096, ge=1024, le=1_048_576, description="peak memory (RSS, MiB) of the labels process, whatever the "
        "variant's width: sets the block of features ranked at a time (ddr_core.labels.streaming); not part of the "
        "results (nor of config_hash)")

    def config_hash(self) -> str:
        """Without ``memory_budget_mib``, which changes how the labels are computed, never what they are (the
        hashes of folders made before it existed hold)."""
        return config_hash(self.model_dump(mode="json", exclude={"memory_budget_mib"}))


SCHEMA: dict[str, Any] = {
    "channel": pl.Int32, "label": pl.String, "score": pl.Float64, "chance": pl.Float64, "p_value": pl.Float64,
    "q_value": pl.Float64, "significant": pl.Boolean, "score_low": pl.Float64, "score_high": pl.Float64,
    "tpr": pl.Float64, "tnr": pl.Float64, "tnr_hard": pl.Float64, "tnr_easy": pl.Float64,
    "n_labelling": pl.Int32, "n_positive": pl.Int32, "n_negative": pl.Int32, "n_hard": pl.Int32,
    "concept": pl.String, "label_matches": pl.Boolean,
}


def concept_values(labels: pl.DataFrame | None, families: Sequence[str]) -> dict[str, tuple[Any, ...]] | None:
    """Labelled prompt -> its values of ``families`` (``None`` without labels): what :func:`_one_off` compares."""
    if labels is None or not families:
        return None
    table = labels.drop_nulls(list(families))
    return {row[0]: row[1:] for row in table.select("prompt", *families).iter_rows()}


def _one_off(prompts: Sequence[str], values: dict[str, tuple[Any, ...]] | None) -> set[str] | None:
    """The labelled prompts that differ from one of ``prompts`` in exactly one family (``None`` without labels)."""
    if values is None:
        return None
    anchors = [values[p] for p in prompts if p in values]
    return {p for p, v in values.items()
            if any(sum(a != b for a, b in zip(v, anchor, strict=True)) == 1 for anchor in anchors)}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def label_features(activations: pl.DataFrame, encoded: np.ndarray, row_of: dict[int, int], labeller: Any,
                   channels: Sequence[int], config: FeatureLabelsConfig | None = None, *,
                   labels: pl.DataFrame | None = None, families: Sequence[str] = (),
                   concepts: dict[int, str] | None = None) -> pl.DataFrame:
    """One row per channel (columns :data:`SCHEMA`): its label from the labelling half of its top prompts, and the
    detection test of that label on the held-out half against negatives (:mod:`ddr_core.labels.detection`).

    Args:
        activations: ``channel, prompt, generation_id, activation``: per channel and prompt the prompt's best
            generation (one image per prompt).
        encoded, row_of: the labeller's rows of the capture's images, and generation id -> row.
        labeller: a :class:`~ddr_core.labels.protocol.Labeller`.
        labels, families: concept labels of prompts (hard negatives share all but one value with a positive).
        concepts: channel -> its significant concepts (``"colour=red, shape=circle"``; ``""``: none), the
            ``feature_concepts`` verdict the label is checked against (``label_matches``).

    Top prompts are among the ``n_top`` best those above the ``negative_quantile`` of the channel's per-prompt
    activations (the negatives' level). A channel with fewer than 4 such prompts with an image gets a row of nulls. ``q_value``:
    Benjamini-Hochberg over the variant's channels; ``significant``: ``q_value < alpha``.

    Holds every channel's rows of ``activations`` at once; the stage streams blocks of channels through
    :func:`label_block` and corrects them together with :func:`with_q_values` (the same table).
    """
    config = config or FeatureLabelsConfig()
    block = label_block(activations, encoded, row_of, labeller, channels, config, labels=labels, families=families,
                        concepts=concepts)
    return with_q_values(block, config.alpha)


def label_block(activations: pl.DataFrame, encoded: np.ndarray, row_of: dict[int, int], labeller: Any,
                channels: Sequence[int], config: FeatureLabelsConfig, *, labels: pl.DataFrame | None = None,
                families: Sequence[str] = (), concepts: dict[int, str] | None = None,
                values: dict[str, tuple[Any, ...]] | None = None, presorted: bool = False) -> pl.DataFrame:
    """:func:`label_features` of a block of ``channels`` before the Benjamini-Hochberg correction over the
    variant (``q_value`` and ``significant`` null; :func:`with_q_values` fills them over every block).
    ``values``: :func:`concept_values` of ``labels`` computed once for every block (default: from ``labels``).
    ``presorted``: ``activations`` already in ``channel`` ascending, ``activation`` descending, ``generation_id``
    ascending order (:mod:`ddr_core.labels.streaming`'s blocks): not sorted again (memory: no sorted copy)."""
    if values is None:
        values = concept_values(labels, families)
    # one sorted table sliced per channel (no copy per channel): activation descending, ties to the lower id
    with_image = activations["generation_id"].is_in(list(row_of))
    if presorted:
        ranked = activations if with_image.all() else activations.filter(with_image)
    else:
        ranked = activations.filter(with_image).sort(["channel", "activation", "generation_id"],
                                                     descending=[False, True, False])
    del with_image
    keys = ranked["channel"].to_numpy().astype(np.int64)
    wanted = np.asarray(list(channels), dtype=np.int64)
    starts, stops = np.searchsorted(keys, wanted, side="left"), np.searchsorted(keys, wanted, side="right")
    rows: list[dict[str, Any]] = []
    for channel, start, stop in zip(wanted.tolist(), starts.tolist(), stops.tolist(), strict=True):
        row: dict[str, Any] = {name: None for name in SCHEMA}
        row["channel"] = int(channel)
        concept = None if concepts is None else concepts.get(int(channel))
        row["concept"] = concept
        frame = ranked.slice(start, stop - start)
        if frame.height < 4:
            rows.append(row)
            continue
        prompts = frame["prompt"].to_list()
        values_of = frame["activation"].to_numpy()
        generation = dict(zip(prompts, frame["generation_id"].to_list(), strict=True))
        # top examples activate the feature: above the negatives' quantile (a sparse feature is 0 on most prompts,
        # and a prompt at the negatives' level is no positive; ties at 0 would be ordered by generation id)
        cut = float(np.quantile(values_of, config.negative_quantile))
        top = [p for p, value in zip(prompts[:config.n_top], values_of[:config.n_top], strict=True) if value > cut]
        if len(top) < 4:
            rows.append(row)
            continue
        labelling, held_out = split_by_prompt(top, config.seed + int(channel))
        label = labeller.label(encoded, np.asarray([row_of[generation[p]] for p in labelling], dtype=np.int64))
        hard, easy = choose_negatives(
            prompts, frame["activation"].to_list(), top, config.negatives_per_positive * len(held_out),
            quantile=config.negative_quantile, hard_share=config.hard_share, seed=config.seed + int(channel),
            hard_candidates=_one_off(held_out, values))
        scored = held_out + hard + easy
        positive = np.asarray([True] * len(held_out) + [False] * (len(hard) + len(easy)))
        row.update({"label": label, "n_labelling": len(labelling), "n_hard": len(hard)})
        if label is not None:
            predicted = labeller.detect(label, encoded,
                                        np.asarray([row_of[generation[p]] for p in scored], dtype=np.int64))
            test = detection_test(predicted, positive, resamples=config.bootstrap_resamples,
                                  seed=config.seed + int(channel))
            negatives = ~predicted[len(held_out):]
            row.update({"score": test["score"], "chance": CHANCE, "p_value": test["p_value"],
                        "score_low": test["interval"][0], "score_high": test["interval"][1], "tpr": test["tpr"],
                        "tnr": test["tnr"], "tnr_hard": _mean(negatives[:len(hard)]),
                        "tnr_easy": _mean(negatives[len(hard):]), "n_positive": test["n_positive"],
                        "n_negative": test["n_negative"]})
            if concept:
                row["label_matches"] = label in [c.strip() for c in concept.split(",")]
        rows.append(row)
    for row in rows:  # NaN (an empty class) is no measurement
        for key in ("score", "p_value", "score_low", "score_high", "tpr", "tnr", "tnr_hard", "tnr_easy"):
            if isinstance(row[key], float) and math.isnan(row[key]):
                row[key] = None
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def with_q_values(table: pl.DataFrame, alpha: float) -> pl.DataFrame:
    """``table`` (rows of :func:`label_block`, every channel of the variant) with ``q_value``: Benjamini-Hochberg
    over its ``p_value`` column, and ``significant``: ``q_value < alpha`` (null where there is no p-value)."""
    from ddr_core.concept_stats import benjamini_hochberg

    q = benjamini_hochberg([np.nan if p is None else p for p in table["p_value"].to_list()])
    q_values = [None if math.isnan(value) else float(value) for value in q]
    significant = [None if value is None else bool(value < alpha) for value in q_values]
    return table.with_columns(pl.Series("q_value", q_values, dtype=pl.Float64),
                              pl.Series("significant", significant, dtype=pl.Boolean))


def match_test(labels: Sequence[str], concepts: Sequence[str], *, permutations: int = 10000,
               seed: int = 0) -> dict[str, Any]:
    """How often a channel's label is one of its significant concepts, against labels permuted among the channels
    (``chance``: the permutation mean; ``p_value`` one-sided). Units: channels with a label and a concept."""
    sets = [{c.strip() for c in concept.split(",")} for concept in concepts]
    n = len(labels)
    if n == 0:
        return {"rate": None, "chance": None, "p_value": None, "n": 0, "interval": [None, None]}
    hits = np.asarray([[label in s for s in sets] for label in labels], dtype=float)  # hits[i, j]: label i in C_j
    observed = float(np.trace(hits) / n)
    rng = np.random.default_rng(seed)
    null = np.asarray([hits[rng.permutation(n), np.arange(n)].mean() for _ in range(permutations)])
    from ddr_core.concept_stats import bootstrap_interval

    low, high = bootstrap_interval(np.diag(hits), seed=seed)
    return {"rate": observed, "chance": float(null.mean()),
            "p_value": float((1 + (null >= observed - 1e-12).sum()) / (1 + permutations)), "n": n,
            "interval": [None if math.isnan(low) else low, None if math.isnan(high) else high]}


def summarise_labels(table: pl.DataFrame, config: FeatureLabelsConfig) -> dict[str, Any]:
    """Counts, the mean detection score with a bootstrap interval over channels (chance 0.5), the significant
    share, the hard / easy negatives' true-negative rates, and (with concepts) the label-matches-concept test."""
    from ddr_core.concept_stats import bootstrap_interval

    scored = table.filter(pl.col("score").is_not_null())
    scores = scored["score"].to_list()
    low, high = bootstrap_interval(scores, resamples=config.bootstrap_resamples, seed=config.seed)
    summary: dict[str, Any] = {
        "channels": table.height, "labelled": int(table["label"].is_not_null().sum()), "scored": scored.height,
        "significant": int(scored["significant"].sum()) if scored.height else 0, "chance": CHANCE,
        "score_mean": _mean(scores) if scores else None,
        "score_interval": [None if math.isnan(low) else low, None if math.isnan(high) else high],
        "score_median": float(np.median(scores)) if scores else None,
        "tnr_hard_mean": scored["tnr_hard"].drop_nulls().mean() if scored.height else None,
        "tnr_easy_mean": scored["tnr_easy"].drop_nulls().mean() if scored.height else None,
        "top_labels": [{"label": label, "channels": count} for label, count in
                       scored.group_by("label").agg(pl.len()).sort(["len", "label"], descending=[True, False])
                       .head(10).iter_rows()],
    }
    with_concept = scored.filter(pl.col("concept").is_not_null() & (pl.col("concept") != ""))
    if table["concept"].is_not_null().any():
        summary["truth"] = {
            "channels_with_concept": with_concept.height,
            "match": match_test(with_concept["label"].to_list(), with_concept["concept"].to_list(),
                                permutations=config.permutations, seed=config.seed),
            "score_mean_with_concept": with_concept["score"].mean() if with_concept.height else None,
            "score_mean_without_concept": scored.filter(pl.col("concept") == "")["score"].mean(),
        }
    return summary


def write_feature_labels(out_dir: str | Path, table: pl.DataFrame, summary: dict[str, Any]) -> Path:
    """``feature_labels.parquet`` + ``summary.json`` into ``out_dir``, replaced as a whole."""
    from ddr_core.atomic import atomic_dir, atomic_write_json

    out = Path(out_dir)
    with atomic_dir(out) as staging:
        table.write_parquet(staging / TABLE_FILE)
        atomic_write_json(staging / SUMMARY_FILE, {"format": FORMAT, **summary})
    return out


def read_feature_labels(out_dir: str | Path) -> tuple[pl.DataFrame, dict[str, Any]] | None:
    """``(table, summary)`` of a finished output folder, or ``None`` when there is none."""
    out = Path(out_dir)
    if not (out / SUMMARY_FILE).is_file() or not (out / TABLE_FILE).is_file():
        return None
    return pl.read_parquet(out / TABLE_FILE), json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
