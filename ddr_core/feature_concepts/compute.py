"""The feature-concepts table and summary of one variant (:func:`compute_feature_concepts`, written
atomically) and reading a finished one back (:func:`read_feature_concepts`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.atomic import atomic_dir, atomic_write_json
from ddr_core.feature_concepts.config import FORMAT, SUMMARY_FILE, TABLE_FILE, FeatureConceptsConfig, LogFn
from ddr_core.feature_concepts.images import (
    _recognisability_summary,
    _world_rmse,
    channel_agreement,
    channel_recognisability,
    classify_images,
    dream_images,
    image_predictions,
    load_images,
    prior_images,
    raised_dream_images,
)
from ddr_core.feature_concepts.purity import channel_purity, top_examples
from ddr_core.feature_concepts.summary import summarise, table_columns


@dataclass
class FeatureConceptsResult:
    table: pl.DataFrame
    summary: dict[str, Any]
    out_dir: Path


def compute_feature_concepts(
    stats_dir: str | Path,
    labels: pl.DataFrame,
    families: Sequence[str],
    out_dir: str | Path,
    *,
    variant: str,
    basis: str,
    config: FeatureConceptsConfig | None = None,
    data_root: str | Path | None = None,
    priors_dir: str | Path | None = None,
    dreams_dir: str | Path | None = None,
    classifier: Any | None = None,
    generation_pool: pl.DataFrame | None = None,
    world_renders: Callable[[int], np.ndarray] | None = None,
    generation_images: Sequence[np.ndarray] | None = None,
    store: Any | None = None,
    log: LogFn | None = None,
) -> FeatureConceptsResult:
    """Score every channel of one variant and write ``feature_concepts.parquet`` + ``summary.json``.

    Args:
        stats_dir: the variant's finished timestep statistics (its ``summary.json`` gives the width).
        labels: :func:`prompt_labels` of the prompt dataset.
        families: concept families scored (columns of ``labels``).
        out_dir: output folder (replaced as a whole).
        variant, basis: recorded in the table and summary (``raw`` / ``sae``).
        data_root: what the image paths of priors and dreams are relative to (needed with them).
        priors_dir, dreams_dir: the variant's priors / dreams folders (missing or ``None``: skipped).
        classifier: a :class:`~ddr_core.concept_classifier.ConceptClassifier`; ``None``: no agreement.
        generation_pool: the capture's generations (``prompt`` column) for the chance purity.
        world_renders: image side -> ``(m, side, side, 3)`` uint8 renders of the model's world
            (:func:`ddr_core.toy_world.reference_renders`): each classified image also gets its RMSE to
            the nearest render, and a channel the share of its images within ``recognisable_rmse``.
        generation_images: the capture's generated images, scored the same way as a reference (what the
            model draws when prompted).
        store: the capture's activation store (``examples="peak_all_generations"`` ranks its generations).
    """
    from ddr_core.statistics import read_summary

    config = config or FeatureConceptsConfig()
    say = log or (lambda _message: None)
    families = list(families)
    missing = [f for f in families if f not in labels.columns]
    if missing:
        raise ValueError(f"the prompt labels have no column for {missing}; columns: {labels.columns}")
    stats_summary = read_summary(stats_dir)
    width = int(stats_summary["width"])
    examples = top_examples(stats_dir, config, store=store, variant=variant)
    table = channel_purity(examples, labels, families, width, config.min_examples, generation_pool, config.alpha)
    unlabelled = examples.join(labels.drop_nulls(families), on="prompt", how="anti")
    say(f"feature concepts {variant}: {table['purity'].is_not_null().sum()} of {width} channels scored "
        f"from {examples.height} examples ({unlabelled.height} without labels)")
    sources: list[str] = []
    predictions_kept: dict[str, pl.DataFrame] = {}
    predictions_scored: dict[str, pl.DataFrame] = {}
    if classifier is not None:
        channels = list(range(width))
        wanted = {"prior": (config.priors, priors_dir, prior_images),
                  "dream": (config.dreams, dreams_dir, dream_images)}
        for source, (enabled, folder, finder) in wanted.items():
            if not enabled or folder is None:
                continue
            if data_root is None:
                raise ValueError("data_root is needed to read prior and dream images")
            images = finder(folder, channels) if Path(folder).is_dir() else []
            loaded = load_images(data_root, [p for _, p in images])
            predicted = classify_images(classifier, loaded, families,
                                        config.classifier_batch_size) if images else {f: [] for f in families}
            frame = image_predictions(images, predicted, families)
            if world_renders is not None:
                frame = frame.with_columns(pl.Series("world_rmse", _world_rmse(loaded, world_renders),
                                                     dtype=pl.Float64))
            predictions_kept[source] = frame  # every image's prediction (the benchmark's "no-ops included" row)
            if source == "dream":  # scored: only dreams that raised their channel (ddr_core.dream_verdict)
                frame = frame.filter(pl.col("image").is_in(sorted(raised_dream_images(folder, channels))))
            predictions_scored[source] = frame
            if world_renders is not None:
                table = table.join(channel_recognisability(frame, source, config.recognisable_rmse),
                                   on="channel", how="left")
            table = table.join(channel_agreement(table, frame, families, source, config.alpha),
                               on="channel", how="left")
            sources.append(source)
            say(f"feature concepts {variant}: {len(images)} {source} image(s) classified")
    table = table.with_columns(pl.lit(basis).alias("basis"))
    table = table.select(table_columns(families, sources, world=world_renders is not None and classifier is not None))
    world = None
    if world_renders is not None:
        world = {"recognisable_rmse": config.recognisable_rmse,
                 "sources": {source: _recognisability_summary(predictions_scored[source]["world_rmse"].to_numpy(),
                                                              config.recognisable_rmse)
                             for source in sources if "world_rmse" in predictions_scored[source].columns}}
        if generation_images:
            world["generations"] = _recognisability_summary(_world_rmse(list(generation_images), world_renders),
                                                            config.recognisable_rmse)
    summary = {
        "format": FORMAT, "variant": variant, "basis": basis, "families": families, "width": width,
        "config": config.model_dump(mode="json"), "config_hash": config.config_hash(),
        "stats_config_hash": stats_summary.get("config_hash"), "sources": sources,
        "classifier": classifier is not None, "unlabelled_examples": unlabelled.height,
        **summarise(table, families, sources, config, world, predictions_scored),
    }
    out = Path(out_dir)
    with atomic_dir(out) as staging:
        table.write_parquet(staging / TABLE_FILE)
        for source, frame in predictions_kept.items():
            frame.write_parquet(staging / f"{source}_predictions.parquet")
        atomic_write_json(staging / SUMMARY_FILE, summary)
    return FeatureConceptsResult(table=table, summary=summary, out_dir=out)


def read_feature_concepts(out_dir: str | Path) -> tuple[pl.DataFrame, dict[str, Any]] | None:
    """``(table, summary)`` of a finished output folder, or ``None`` when there is none."""
    out = Path(out_dir)
    if not (out / SUMMARY_FILE).is_file() or not (out / TABLE_FILE).is_file():
        return None
    return pl.read_parquet(out / TABLE_FILE), json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
