"""The images of a channel's priors and dreams: their classification by the model's concept classifier
(agreement with the channel's dominant values) and their recognisability (distance to the world's renders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.feature_concepts.purity import dominant_value


def prior_images(priors_dir: str | Path, channels: Sequence[int]) -> list[tuple[int, str]]:
    """``(channel, image path relative to the data root)`` of every finished prior image."""
    from ddr_core.channel_store import read_prior

    images = []
    for channel in channels:
        record = read_prior(priors_dir, channel)
        if record and record.get("status") == "done":
            images += [(int(channel), str(path)) for path in record.get("images") or []]
    return images


def dream_images(dreams_dir: str | Path, channels: Sequence[int]) -> list[tuple[int, str]]:
    """``(channel, image path relative to the data root)`` of every final dream image (all timesteps)."""
    from ddr_core.channel_store import read_dream

    images = []
    for channel in channels:
        record = read_dream(dreams_dir, channel)
        if record is None:
            continue
        for timestep in sorted(record.get("results") or {}, key=int, reverse=True):
            images += [(int(channel), str(p)) for p in record["results"][timestep].get("images") or []]
    return images


def raised_dream_images(dreams_dir: str | Path, channels: Sequence[int]) -> set[str]:
    """The final dream images (paths as in :func:`dream_images`) whose dream raised its channel above its start's
    noise (:func:`ddr_core.dream_verdict.with_raised` on the folder's ``quality.parquet``): the only dreams that
    are scored. No quality table: none (an unmeasured dream is not shown as a dream either)."""
    from ddr_core.channel_store import read_dream
    from ddr_core.dream_verdict import VERDICT_SCHEMA, with_raised

    path = Path(dreams_dir) / "quality.parquet"
    if not path.is_file():
        return set()
    quality = pl.read_parquet(path)
    if not all(c in quality.columns for c in VERDICT_SCHEMA):
        quality = with_raised(quality)
    raised = {(int(c), int(t), int(s)) for c, t, s in
              quality.filter(pl.col("raised")).select("channel", "timestep", "seed").iter_rows()}
    images: set[str] = set()
    for channel in channels:
        record = read_dream(dreams_dir, channel)
        for timestep, result in ((record or {}).get("results") or {}).items():
            for seed, image in zip(result.get("seeds") or [], result.get("images") or [], strict=False):
                if (int(channel), int(timestep), int(seed)) in raised:
                    images.add(str(image))
    return images


def load_images(data_root: str | Path, paths: Sequence[str]) -> list[np.ndarray]:
    """RGB ``(H, W, 3)`` uint8 arrays of PNGs below the data root (a path that escapes it is refused)."""
    from PIL import Image

    from ddr_core.paths import resolve_in_data_root

    arrays = []
    for relative in paths:
        path = resolve_in_data_root(data_root, relative)
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return arrays


def classify_images(classifier: Any, images: Sequence[np.ndarray], families: Sequence[str],
                    batch_size: int = 256) -> dict[str, list[str]]:
    """Predicted label name per family for each image (images of mixed sizes are grouped by size).

    Raises:
        ValueError: the classifier has no head for a family.
    """
    from ddr_core.concept_classifier import predict_concepts

    heads = classifier.config.heads
    missing = [family for family in families if family not in heads]
    if missing:
        raise ValueError(f"the concept classifier has no head for {missing} (heads: {sorted(heads)}); "
                         f"score only the families it reads, or train a classifier with those heads")
    predictions: dict[str, list[str | None]] = {family: [None] * len(images) for family in families}
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            predicted = predict_concepts(classifier, np.stack([images[i] for i in chunk]))
            for family in families:
                for i, label in zip(chunk, predicted[family], strict=True):
                    predictions[family][i] = heads[family][int(label)]
    return predictions  # type: ignore[return-value]


def image_predictions(
    images: Sequence[tuple[int, str]], predictions: dict[str, list[str]], families: Sequence[str]
) -> pl.DataFrame:
    """``channel, image`` + one predicted-label column per family."""
    schema = {"channel": pl.Int32, "image": pl.String, **{f: pl.String for f in families}}
    return pl.DataFrame({"channel": [c for c, _ in images], "image": [p for _, p in images],
                         **{f: predictions[f] for f in families}}, schema=schema)


def channel_agreement(purity: pl.DataFrame, predicted: pl.DataFrame, families: Sequence[str],
                      source: str, alpha: float = 0.05) -> pl.DataFrame:
    """Per channel of ``purity``: ``n_<source>_images`` and per family ``<source>_agreement_<f>`` (share
    of its images predicted as its dominant value; null without images or dominant value) and
    ``<source>_vote_<f>`` (most common prediction), plus ``<source>_agreement`` (mean over families) and
    ``<source>_agreement_selective`` (mean over the families the channel is significantly selective for,
    ``q_<f> < alpha``; null when it has none). A channel that fires on every red shape is not wrong to draw
    a red square when its examples were red circles: its shape agreement is noise, its selective
    agreement is not."""
    groups = {int(key[0]): frame for key, frame in predicted.group_by("channel")}
    rows = []
    columns = ["channel", *[f"dominant_{f}" for f in families], *[f"q_{f}" for f in families]]
    for row in purity.select(columns).iter_rows(named=True):
        frame = groups.get(int(row["channel"]))
        out: dict[str, Any] = {"channel": row["channel"], f"n_{source}_images": 0 if frame is None else frame.height}
        shares, selective = [], []
        for family in families:
            values = [] if frame is None else frame[family].to_list()
            out[f"{source}_vote_{family}"] = dominant_value(values)[0]
            dominant = row[f"dominant_{family}"]
            share = (sum(v == dominant for v in values) / len(values)) if values and dominant is not None else None
            out[f"{source}_agreement_{family}"] = share
            if share is not None:
                shares.append(share)
                if row[f"q_{family}"] is not None and row[f"q_{family}"] < alpha:
                    selective.append(share)
        out[f"{source}_agreement"] = float(np.mean(shares)) if len(shares) == len(families) else None
        out[f"{source}_agreement_selective"] = float(np.mean(selective)) if selective else None
        rows.append(out)
    schema: dict[str, Any] = {"channel": pl.Int32, f"n_{source}_images": pl.Int32}
    for family in families:
        schema[f"{source}_vote_{family}"] = pl.String
        schema[f"{source}_agreement_{family}"] = pl.Float64
    schema[f"{source}_agreement"] = pl.Float64
    schema[f"{source}_agreement_selective"] = pl.Float64
    return pl.DataFrame(rows, schema=schema, orient="row")


def _world_rmse(images: Sequence[np.ndarray], renders_for: Callable[[int], np.ndarray]) -> np.ndarray:
    """Each image's RMSE to the nearest render of the world drawn at the image's (square) size."""
    from ddr_core.toy_world import nearest_render_rmse

    out = np.zeros(len(images))
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    for shape, indices in by_size.items():
        if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
            raise ValueError(f"images of shape {shape} cannot be compared with the world's renders, which are "
                             f"square RGB: generate priors / dreams with height == width")
        out[indices] = nearest_render_rmse(np.stack([images[i] for i in indices]), renders_for(shape[0]))
    return out


def channel_recognisability(predicted: pl.DataFrame, source: str, recognisable_rmse: float) -> pl.DataFrame:
    """Per channel of ``predicted`` (with a ``world_rmse`` column): ``<source>_world_rmse`` (median over its
    images) and ``<source>_recognisable`` (share of its images within ``recognisable_rmse``)."""
    return (predicted.group_by("channel")
            .agg(pl.col("world_rmse").median().alias(f"{source}_world_rmse"),
                 (pl.col("world_rmse") < recognisable_rmse).mean().cast(pl.Float64).alias(f"{source}_recognisable"))
            .with_columns(pl.col("channel").cast(pl.Int32)))


def _recognisability_summary(rmse: np.ndarray, recognisable_rmse: float) -> dict[str, Any]:
    rmse = np.asarray(rmse, dtype=np.float64)
    if rmse.size == 0:
        return {"images": 0, "recognisable": None, "rmse_median": None}
    return {"images": int(rmse.size), "recognisable": float((rmse < recognisable_rmse).mean()),
            "rmse_median": float(np.median(rmse))}
