"""A channel's top examples (one per prompt) and their purity per concept family, with its exact null
(:mod:`ddr_core.concept_stats`) and significance.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.feature_concepts.config import FeatureConceptsConfig


def _top_peak_timesteps(stats_dir: Path) -> pl.DataFrame:
    """``channel, timestep``: the observed timestep nearest each channel's highest activity peak."""
    return (pl.read_parquet(stats_dir / "activity_peaks.parquet")
            .filter(pl.col("peak_rank") == 0)
            .select(pl.col("channel").cast(pl.Int32), pl.col("observed_timestep").cast(pl.Int64).alias("timestep")))


PEAK_ROWS_PER_CHUNK = 2_000_000  # (generation, channel) rows read at a time by peak_top_prompts


def _peak_parts(store: Any, variant: str, peaks: pl.DataFrame, half: str = "conditional",
                max_generations: int | None = None) -> Any:
    """Per chunk of generations: ``channel, generation_id, activation, timestep`` at each channel's peak."""
    observed = [int(t) for t in store.timesteps()]
    column = {t: i for i, t in enumerate(observed)}
    channels = peaks["channel"].to_numpy().astype(np.int64)
    index = np.asarray([column[int(t)] for t in peaks["timestep"].to_list()], dtype=np.int64)
    for generation_ids, _, activations in store.iter_dense(variant, half, max_generations=max_generations):
        values = activations[:, index, channels]  # (g, channels)
        yield pl.DataFrame({
            "channel": np.tile(channels, len(generation_ids)).astype(np.int32),
            "generation_id": np.repeat(generation_ids.astype(np.int64), len(channels)),
            "activation": values.reshape(-1).astype(np.float64),
            "timestep": np.tile(np.asarray(peaks["timestep"].to_list(), dtype=np.int64), len(generation_ids)),
        })


def peak_activations(store: Any, variant: str, peaks: pl.DataFrame, half: str = "conditional") -> pl.DataFrame:
    """``channel, generation_id, activation, timestep``: every generation's activation of each channel at
    that channel's peak timestep (``peaks``: ``channel, timestep``), read batch by batch from the store.
    Holds generations x channels rows: :func:`peak_top_prompts` keeps only the best prompts instead."""
    parts = list(_peak_parts(store, variant, peaks, half))
    schema = {"channel": pl.Int32, "generation_id": pl.Int64, "activation": pl.Float64, "timestep": pl.Int64}
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def _best_prompts(frame: pl.DataFrame, n: int | None) -> pl.DataFrame:
    ranked = (frame.sort(["channel", "activation", "generation_id"], descending=[False, True, False])
              .unique(["channel", "prompt"], keep="first", maintain_order=True))
    return ranked if n is None else ranked.filter(pl.int_range(pl.len()).over("channel") < n)


def peak_top_prompts(store: Any, variant: str, peaks: pl.DataFrame, prompts: pl.DataFrame, n: int,
                     half: str = "conditional") -> pl.DataFrame:
    """Per channel the best generation of each of its ``n`` best prompts at its peak (activation descending,
    ties to the lower generation id), merged chunk by chunk: memory ``channels x (n + chunk)`` rows whatever
    the number of generations. Exact: a prompt outside a channel's ``n`` best so far stays behind ``n`` other
    prompts unless a new generation of it beats them, and that generation is in the new chunk."""
    chunk = max(1, PEAK_ROWS_PER_CHUNK // max(1, peaks.height))
    kept: pl.DataFrame | None = None
    for part in _peak_parts(store, variant, peaks, half, max_generations=chunk):
        part = part.join(prompts, on="generation_id", how="left")
        kept = _best_prompts(part if kept is None else pl.concat([kept, part]), n)
    if kept is None:
        return pl.DataFrame(schema={"channel": pl.Int32, "generation_id": pl.Int64, "activation": pl.Float64,
                                    "timestep": pl.Int64, "prompt": pl.String})
    return kept


def top_examples(stats_dir: str | Path, config: FeatureConceptsConfig, store: Any | None = None,
                 variant: str | None = None) -> pl.DataFrame:
    """The top examples of every channel, **one per prompt**: ``channel, rank, generation_id, prompt,
    activation, timestep`` (``rank`` 0-based over distinct prompts; a prompt's best generation stands for
    it; ``timestep`` the examples' timestep for the peak modes, the timestep of the largest activation for
    ``all_timesteps``).

    A capture draws several images per prompt, and their labels are the prompt's: counting a prompt
    once per image would let one prompt fill a channel's top examples, and no null over prompts could
    then be exact. ``peak_all_generations`` (default) ranks every generation of the capture at the
    channel's top peak (``store``: the capture's :class:`~ddr_core.activation_store.ActivationStore`,
    ``variant``); the other modes use the recorded dataset examples (the generations in whose top-k the
    channel was), which may hold only a few distinct prompts.
    """
    stats_dir = Path(stats_dir)
    if config.examples == "peak_all_generations":
        if store is None or variant is None:
            raise ValueError("examples='peak_all_generations' reads the capture's activation store: pass store= "
                             "and variant= (or choose examples='top_peak')")
        prompts = store.read_generations().select(pl.col("generation_id").cast(pl.Int64), "prompt")
        if config.n_examples is not None:  # streamed: memory independent of the number of generations
            ranked = peak_top_prompts(store, variant, _top_peak_timesteps(stats_dir), prompts, config.n_examples)
        else:
            ranked = (peak_activations(store, variant, _top_peak_timesteps(stats_dir))
                      .join(prompts, on="generation_id", how="left")
                      .sort(["channel", "activation", "generation_id"], descending=[False, True, False]))
    elif config.examples == "top_peak":
        examples = pl.read_parquet(stats_dir / "dataset_examples.parquet")
        ranked = (examples.with_columns(pl.col("timestep").cast(pl.Int64), pl.col("channel").cast(pl.Int32))
                  .join(_top_peak_timesteps(stats_dir), on=["channel", "timestep"], how="inner")
                  .sort("channel", "rank"))
    else:
        examples = pl.read_parquet(stats_dir / "dataset_examples.parquet")
        ranked = (examples.sort("channel", "activation", "timestep", descending=[False, True, True])
                  .group_by("channel", "generation_id", maintain_order=True)
                  .agg(pl.len().alias("n_timesteps"), pl.col("activation").first(), pl.col("timestep").first(),
                       pl.col("prompt").first())
                  .sort(["channel", "n_timesteps", "activation", "generation_id"],
                        descending=[False, True, True, False]))
    chosen = (ranked.unique(["channel", "prompt"], keep="first", maintain_order=True)
              .with_columns(pl.int_range(pl.len()).over("channel").alias("rank")))
    if config.n_examples is not None:
        chosen = chosen.filter(pl.col("rank") < config.n_examples)
    return chosen.select(pl.col("channel").cast(pl.Int32), pl.col("rank").cast(pl.Int32),
                         pl.col("generation_id").cast(pl.Int64), "prompt",
                         pl.col("activation").cast(pl.Float64), pl.col("timestep").cast(pl.Int64))


def dominant_value(values: Sequence[str]) -> tuple[str | None, float | None]:
    """The most common value (ties: alphabetically first) and its share; ``(None, None)`` when empty."""
    if not values:
        return None, None
    counts = Counter(values)
    best = min(counts, key=lambda value: (-counts[value], value))
    return best, counts[best] / len(values)


def _joint_values(frame: pl.DataFrame, families: Sequence[str]) -> list[str]:
    return ["|".join(row) for row in frame.select(families).iter_rows()]


def _value_counts(values: Sequence[str]) -> list[int]:
    return sorted(Counter(values).values())


def channel_purity(
    examples: pl.DataFrame,
    labels: pl.DataFrame,
    families: Sequence[str],
    width: int,
    min_examples: int,
    generation_pool: pl.DataFrame | None = None,
    alpha: float = 0.05,
) -> pl.DataFrame:
    """Purity, its exact prompt-level null and significance per channel ``0..width-1`` (module docstring).

    Args:
        examples: :func:`top_examples` rows (``channel``, ``generation_id``, ``prompt``, ...), one per prompt.
        labels: :func:`prompt_labels` (``prompt`` + family columns).
        families: the families scored.
        generation_pool: the capture's generations (a ``prompt`` column): its distinct labelled prompts are
            the population the null draws a channel's prompts from; ``None``: the examples' prompts.
        alpha: the false discovery rate of the per-(channel, family) tests.

    Returns:
        ``channel, n_examples, n_labelled, examples_timestep, purity, purity_joint, chance_purity,
        purity_excess, chance_purity_joint, concept, n_concepts`` and per family ``dominant_<f>, purity_<f>,
        chance_purity_<f>, p_<f>, q_<f>``. ``chance_purity_<f>`` is the exact expected purity of as many
        prompts drawn at random from the pool (labels permuted among prompts), ``p_<f>`` the exact
        probability of a purity at least as high, ``q_<f>`` its Benjamini-Hochberg q-value over every
        (channel, family) pair of the table; ``concept`` lists ``family=value`` of each family with
        ``q_<f> < alpha`` (empty: not selective).
    """
    from ddr_core.concept_stats import benjamini_hochberg, expected_purity, max_count_tail

    families = list(families)
    labelled = examples.join(labels, on="prompt", how="left")
    complete = labelled.drop_nulls(families)
    if generation_pool is None:
        generation_pool = examples.select("prompt")
    pool = generation_pool.select("prompt").unique().join(labels, on="prompt", how="inner").drop_nulls(families)
    pool_counts = {family: _value_counts(pool[family].to_list()) for family in families}
    pool_counts["|joint|"] = _value_counts(_joint_values(pool, families))
    cache: dict[tuple[str, int, int], tuple[float, float]] = {}

    def null(key: str, size: int, observed: int) -> tuple[float, float]:
        """(expected purity, P(purity >= observed / size)) of ``size`` prompts drawn from the pool."""
        if (key, size, observed) not in cache:
            if size > pool.height:
                cache[(key, size, observed)] = (float("nan"), float("nan"))
            else:
                cache[(key, size, observed)] = (expected_purity(pool_counts[key], size),
                                                max_count_tail(pool_counts[key], size, observed))
        return cache[(key, size, observed)]

    per_channel_examples = dict(examples.group_by("channel").agg(pl.len()).iter_rows())
    timesteps = dict(examples.group_by("channel").agg(pl.col("timestep").mode().min()).iter_rows())
    groups = {int(key[0]): frame for key, frame in complete.group_by("channel")}
    rows = []
    for channel in range(width):
        frame = groups.get(channel)
        n_labelled = 0 if frame is None else frame.height
        row: dict[str, Any] = {"channel": channel, "n_examples": int(per_channel_examples.get(channel, 0)),
                               "n_labelled": n_labelled, "examples_timestep": timesteps.get(channel)}
        scored = frame is not None and n_labelled >= min_examples
        purities, chances = [], []
        for family in families:
            value, share = dominant_value(frame[family].to_list()) if scored else (None, None)
            chance, p_value = null(family, n_labelled, round(share * n_labelled)) if scored else (None, None)
            row.update({f"dominant_{family}": value, f"purity_{family}": share, f"chance_purity_{family}": chance,
                        f"p_{family}": p_value})
            if scored:
                purities.append(share)
                chances.append(chance)
        row["purity"] = float(np.mean(purities)) if scored else None
        row["chance_purity"] = float(np.mean(chances)) if scored else None
        row["purity_excess"] = (row["purity"] - row["chance_purity"]
                                if scored and not math.isnan(row["chance_purity"]) else None)
        joint = dominant_value(_joint_values(frame, families))[1] if scored else None
        row["purity_joint"] = joint
        row["chance_purity_joint"] = null("|joint|", n_labelled, round(joint * n_labelled))[0] if scored else None
        rows.append(row)
    # one Benjamini-Hochberg correction over every (channel, family) test of the variant
    p_matrix = np.asarray([[np.nan if r[f"p_{f}"] is None else r[f"p_{f}"] for f in families] for r in rows],
                          dtype=float).reshape(len(rows), len(families))
    q_matrix = benjamini_hochberg(p_matrix.reshape(-1)).reshape(p_matrix.shape)
    for row, q_row in zip(rows, q_matrix, strict=True):
        significant = []
        for family, q in zip(families, q_row, strict=True):
            row[f"q_{family}"] = None if math.isnan(q) else float(q)
            if not math.isnan(q) and q < alpha:
                significant.append(f"{family}={row[f'dominant_{family}']}")
        row["concept"] = ", ".join(significant)
        row["n_concepts"] = len(significant)
    schema: dict[str, Any] = {"channel": pl.Int32, "n_examples": pl.Int32, "n_labelled": pl.Int32,
                              "examples_timestep": pl.Int64}
    for family in families:
        schema.update({f"dominant_{family}": pl.String, f"purity_{family}": pl.Float64,
                       f"chance_purity_{family}": pl.Float64, f"p_{family}": pl.Float64})
    schema.update({"purity": pl.Float64, "chance_purity": pl.Float64, "purity_excess": pl.Float64,
                   "purity_joint": pl.Float64, "chance_purity_joint": pl.Float64})
    schema.update({f"q_{family}": pl.Float64 for family in families})
    schema.update({"concept": pl.String, "n_concepts": pl.Int32})
    return pl.DataFrame(rows, schema=schema, orient="row")


def significant_families(row: dict[str, Any], families: Sequence[str], alpha: float) -> list[str]:
    """The families a :func:`channel_purity` row is significantly selective for (``q_<f> < alpha``)."""
    return [f for f in families if row.get(f"q_{f}") is not None and row[f"q_{f}"] < alpha]
