"""Bounded-memory ranking for :mod:`ddr_core.labels`: blocks of features read from the activation store.

A feature's label needs every prompt of the capture ranked by its best generation's activation at the feature's
top activity peak: generations x features values in all (5,000 x 20,480 = 100 M for an SAE of the thesis'
scale). The stage never holds them together:

1. :func:`plan_label_blocks` turns ``memory_budget_mib`` (the statistics' idiom and reserve:
   :mod:`ddr_core.stats_streaming`) into a block of features whose generations x block rows fit, and a check,
   raised before anything is read, that one feature's rows fit at all;
2. :func:`best_prompt_blocks` reads each block's values off the store (only the block's channels at their peak
   timesteps: :meth:`~ddr_core.activation_store.ActivationStore.iter_channel_values`), keeps per channel and
   prompt its best generation and spills that (prompts x block rows) to a Parquet file in a work folder;
3. the stage labels each block from its file (:func:`ddr_core.labels.compute.label_block`) and corrects the
   p-values of every block together (:func:`ddr_core.labels.compute.with_q_values`).

Peak memory: one block's rows plus what grows with the number of generations (the images' encodings, the
generations table), never with the width. The rows of each channel are the ones the in-memory path
(:func:`ddr_core.labels.stage.best_prompt_activations`) gives it, so the table is the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.stats_streaming import BASE_MIB, MIB, MemoryBudgetError

BYTES_PER_BLOCK_ROW = 160
"""Peak bytes per (generation, channel) row of a block while it is ranked: the float32 values, the polars frame
(channel, generation id, activation, timestep, the joined prompt) and the sort's and join's copies (measured
with benchmarks/bench_labels_memory.py, rounded up)."""
BYTES_PER_GENERATION = 4096
"""Per generation of the capture, whatever the width: the generations table, the prompts, the images' encodings
and the labeller's row index (generous: a CLIP vocabulary of a few hundred entries is 8 bytes each)."""
READ_VALUES = 4_000_000
"""Values of a block read from the store at a time (``(generations, block)`` float32 slices: 16 MB)."""


@dataclass(frozen=True)
class LabelPlan:
    """How one labels run spends ``budget_mib``: the features ranked at a time, generations read at a time."""

    budget_mib: int
    block_features: int
    chunk_generations: int
    blocks: int


def plan_label_blocks(budget_mib: int, n_generations: int, width: int) -> LabelPlan:
    """Split ``budget_mib`` (peak RSS of the whole process) between the interpreter's :data:`BASE_MIB`, what grows
    with the number of generations (:data:`BYTES_PER_GENERATION`) and one block of generations x features rows
    (:data:`BYTES_PER_BLOCK_ROW`); the block is as wide as fits, at most ``width``.

    Raises:
        MemoryBudgetError: not even one feature's rows fit (names the budget needed).
    """
    generations = max(1, n_generations)
    available = (budget_mib - BASE_MIB) * MIB - generations * BYTES_PER_GENERATION
    per_feature = generations * BYTES_PER_BLOCK_ROW
    if available < per_feature:
        needed = BASE_MIB + int(np.ceil(generations * (BYTES_PER_GENERATION + BYTES_PER_BLOCK_ROW) / MIB)) + 1
        raise MemoryBudgetError(
            f"feature_labels ranks every generation of a feature at once: {n_generations} generations need about "
            f"{(needed - BASE_MIB)} MiB besides {BASE_MIB} MiB for the interpreter, more than "
            f"memory_budget_mib={budget_mib}; raise memory_budget_mib to at least {needed}")
    block = int(max(1, min(max(1, width), available // per_feature)))
    chunk = int(max(1, min(generations, READ_VALUES // block)))
    return LabelPlan(budget_mib, block, chunk, int(np.ceil(max(1, width) / block)))


def _block_rows(store: Any, variant: str, channels: np.ndarray, timesteps: np.ndarray, columns: np.ndarray,
                chunk: int, half: str) -> Iterator[pl.DataFrame]:
    """``channel, generation_id, activation, timestep`` of ``channels`` at their peaks, per chunk of generations
    (the rows and dtypes of :func:`ddr_core.feature_concepts.purity.peak_activations`)."""
    for generation_ids, values in store.iter_channel_values(variant, channels, columns, half, max_generations=chunk):
        yield pl.DataFrame({
            "channel": np.tile(channels, len(generation_ids)).astype(np.int32),
            "generation_id": np.repeat(generation_ids.astype(np.int64), len(channels)),
            "activation": values.reshape(-1).astype(np.float64),
            "timestep": np.tile(timesteps, len(generation_ids)),
        })


def best_prompt_blocks(store: Any, variant: str, peaks: pl.DataFrame, prompts: pl.DataFrame, width: int,
                       plan: LabelPlan, work: Path, half: str = "conditional") -> tuple[list[tuple[range, Path]],
                                                                                        set[int]]:
    """Per block of ``plan.block_features`` channels of ``0..width-1``: ``channel, prompt, generation_id,
    activation`` (per channel and prompt its best generation at the channel's top peak, every prompt kept:
    :func:`ddr_core.labels.stage.best_prompt_activations` of those channels) written to ``work``.

    Args:
        peaks: ``channel, timestep``: each channel's top-peak timestep (channels without one get no rows).
        prompts: ``generation_id, prompt`` of the capture.

    Returns:
        ``[(channels, parquet file)]`` in channel order, and the generation ids that are some channel's best
        generation of some prompt (the images the labeller reads).
    """
    from ddr_core.feature_concepts.purity import _best_prompts

    observed = [int(t) for t in store.timesteps()]
    column_of = {t: i for i, t in enumerate(observed)}
    peak_of = {int(c): int(t) for c, t in peaks.select("channel", "timestep").iter_rows()}
    unknown = sorted({t for t in peak_of.values() if t not in column_of})
    if unknown:
        raise ValueError(f"the statistics' peak timesteps {unknown[:5]} of variant {variant!r} are not among the "
                         f"capture's timesteps {observed[:5]}...: rerun timestep_stats[{variant}] on this capture")
    blocks: list[tuple[range, Path]] = []
    wanted: set[int] = set()
    for index, first in enumerate(range(0, max(1, width), plan.block_features)):
        block = range(first, min(first + plan.block_features, width))
        channels = np.asarray([c for c in block if c in peak_of], dtype=np.int64)
        timesteps = np.asarray([peak_of[int(c)] for c in channels], dtype=np.int64)
        path = work / f"block_{index:05d}.parquet"
        if channels.size:
            columns = np.asarray([column_of[int(t)] for t in timesteps], dtype=np.int64)
            frame = pl.concat(list(_block_rows(store, variant, channels, timesteps, columns,
                                               plan.chunk_generations, half)))
            best = _best_prompts(frame.join(prompts, on="generation_id", how="left"), None)
            del frame
            best = best.select("channel", "prompt", "generation_id", "activation")
        else:
            best = pl.DataFrame(schema={"channel": pl.Int32, "prompt": pl.String, "generation_id": pl.Int64,
                                        "activation": pl.Float64})
        best.write_parquet(path)
        wanted.update(best["generation_id"].to_list())
        blocks.append((block, path))
    return blocks, wanted
