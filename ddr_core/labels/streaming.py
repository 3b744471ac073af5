"""Bounded-memory ranking for :mod:`ddr_core.labels`: blocks of features read from the activation store.

A feature's label needs every prompt of the capture ranked by its best generation's activation at the feature's
top activity peak: generations x features values in all (5,000 x 20,480 = 100 M for an SAE of the thesis'
scale). The stage never holds them together:

1. :func:`plan_label_blocks` turns ``memory_budget_mib`` (the statistics' idiom and reserve:
   :mod:`ddr_core.stats_streaming`) into a block of features whose generations x block values and prompts x
   block ranked rows fit, and a check, raised before anything is read, that one feature fits at all;
2. :func:`best_prompt_blocks` reads each block's values off the store (only the block's channels at their peak
   timesteps: :meth:`~ddr_core.activation_store.ActivationStore.iter_channel_values`), keeps per channel and
   prompt its best generation, ranks each channel's prompts and spills them (prompts x block rows) to a Parquet
   file in a work folder;
3. the stage labels each block from its file (:func:`ddr_core.labels.compute.label_block`) and corrects the
   p-values of every block together (:func:`ddr_core.labels.compute.with_q_values`).

Peak memory: one block plus what grows with the number of generations (the images' encodings, the generations
table), never with the width; images are read and encoded a chunk at a time between the two passes (no block is
held then). Not in the budget: the labeller's own model (a CLIP ViT-B/32 is ~0.6 GB). The rows of each channel are the ones the in-memory path
(:func:`ddr_core.labels.stage.best_prompt_activations`) gives it, so the table is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.stats_streaming import BASE_MIB, MIB, MemoryBudgetError

BYTES_PER_VALUE = 16
"""Peak bytes per (generation, feature) value of a block: the float32 values, the read slices and their
float32 copies (measured with benchmarks/bench_labels_memory.py, rounded up)."""
BYTES_PER_PROMPT_ROW = 64
"""Peak bytes per (prompt, feature) row of a block: its best generation's index, id and activation, the ranking's
indices, the Parquet spill and its read-back table (channel, prompt view, generation id, activation: 36 bytes)
(measured with benchmarks/bench_labels_memory.py at one image per prompt, the most rows, rounded up)."""
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


def plan_label_blocks(budget_mib: int, n_generations: int, width: int, n_prompts: int | None = None) -> LabelPlan:
    """Split ``budget_mib`` (peak RSS of the whole process) between the interpreter's :data:`BASE_MIB`, what grows
    with the number of generations (:data:`BYTES_PER_GENERATION`) and one block of features, each
    ``n_generations`` values (:data:`BYTES_PER_VALUE`) and ``n_prompts`` ranked rows (:data:`BYTES_PER_PROMPT_ROW`;
    default: one prompt per generation, the most); the block is as wide as fits, at most ``width``.

    Raises:
        MemoryBudgetError: not even one feature fits (names the budget needed).
    """
    generations = max(1, n_generations)
    prompts = generations if n_prompts is None else max(1, min(n_prompts, generations))
    available = (budget_mib - BASE_MIB) * MIB - generations * BYTES_PER_GENERATION
    per_feature = generations * BYTES_PER_VALUE + prompts * BYTES_PER_PROMPT_ROW
    if available < per_feature:
        needed = BASE_MIB + int(np.ceil((generations * BYTES_PER_GENERATION + per_feature) / MIB)) + 1
        raise MemoryBudgetError(
            f"feature_labels ranks every generation of a feature at once: {n_generations} generations "
            f"({prompts} prompts) need about {needed - BASE_MIB} MiB besides {BASE_MIB} MiB for the interpreter, more "
            f"than memory_budget_mib={budget_mib}; raise memory_budget_mib to at least {needed}")
    block = int(max(1, min(max(1, width), available // per_feature)))
    chunk = int(max(1, min(generations, READ_VALUES // block)))
    return LabelPlan(budget_mib, block, chunk, int(np.ceil(max(1, width) / block)))


class _PromptGroups:
    """The capture's generations grouped by prompt: per prompt its rows of ``generation_ids`` (ascending ids)."""

    def __init__(self, prompts: pl.DataFrame) -> None:
        frame = prompts.select(pl.col("generation_id").cast(pl.Int64), "prompt").sort("generation_id")
        self.generation_ids = frame["generation_id"].to_numpy()
        self.names = frame["prompt"].unique(maintain_order=True)
        code = {name: i for i, name in enumerate(self.names.to_list())}
        codes = np.asarray([code[name] for name in frame["prompt"].to_list()], dtype=np.int64)
        order = np.argsort(codes, kind="stable")  # by prompt, then generation id
        self.rows = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if codes.size else []

    def rows_of(self, generation_ids: np.ndarray) -> np.ndarray:
        """Row of each generation id (every one must be in the capture's generations table)."""
        rows = np.searchsorted(self.generation_ids, generation_ids)
        if np.any(rows >= self.generation_ids.size) or np.any(self.generation_ids[np.minimum(
                rows, self.generation_ids.size - 1)] != generation_ids):
            missing = sorted(set(generation_ids.tolist()) - set(self.generation_ids.tolist()))[:5]
            raise ValueError(f"generation ids {missing} have dense values but no row in the capture's generations "
                             f"table: run the capture's finalize (ActivationStore.finalize) again")
        return rows


def _best_of_block(store: Any, variant: str, groups: _PromptGroups, channels: np.ndarray, columns: np.ndarray,
                   chunk: int, half: str) -> pl.DataFrame:
    """``channel, prompt, generation_id, activation`` of ``channels``: per channel and prompt the generation with
    the highest activation at the channel's peak, ties to the lower generation id (what sorting every
    ``channel, generation_id, activation, timestep`` row of :func:`ddr_core.feature_concepts.purity.peak_activations`
    and keeping each prompt's first gives; float16 values read as float32, reported as float64)."""
    n = groups.generation_ids.size
    values = np.zeros((n, channels.size), dtype=np.float32)  # generations x block: the block's only big array
    seen = np.zeros(n, dtype=bool)
    for generation_ids, part in store.iter_channel_values(variant, channels, columns, half, max_generations=chunk):
        rows = groups.rows_of(generation_ids)
        values[rows] = part
        seen[rows] = True
    prompt_index, best_rows = [], []
    for index, rows in enumerate(groups.rows):
        rows = rows[seen[rows]]
        if rows.size:  # argmax: the first maximum, i.e. the lowest generation id among ties
            prompt_index.append(index)
            best_rows.append(rows[np.argmax(values[rows], axis=0)])
    if not best_rows:
        return pl.DataFrame(schema=BLOCK_SCHEMA)
    best = np.stack(best_rows, axis=1)  # (channels, prompts): row of the best generation
    activation = np.take_along_axis(values.T, best, axis=1)
    del values, best_rows
    generation = groups.generation_ids[best]
    del best
    # each channel's prompts ranked: activation descending, ties to the lower generation id (label_block's order)
    order = np.lexsort((generation, -activation), axis=1)
    prompt = np.asarray(prompt_index, dtype=np.int64)[order]
    generation = np.take_along_axis(generation, order, axis=1)
    activation = np.take_along_axis(activation, order, axis=1)
    del order
    return pl.DataFrame({
        "channel": np.repeat(channels, len(prompt_index)).astype(np.int32),
        "prompt": groups.names.gather(prompt.reshape(-1)),
        "generation_id": generation.reshape(-1),
        "activation": activation.reshape(-1).astype(np.float64),
    }, schema=BLOCK_SCHEMA)


BLOCK_SCHEMA: dict[str, Any] = {"channel": pl.Int32, "prompt": pl.String, "generation_id": pl.Int64,
                                "activation": pl.Float64}


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
    observed = [int(t) for t in store.timesteps()]
    column_of = {t: i for i, t in enumerate(observed)}
    peak_of = {int(c): int(t) for c, t in peaks.select("channel", "timestep").iter_rows()}
    unknown = sorted({t for t in peak_of.values() if t not in column_of})
    if unknown:
        raise ValueError(f"the statistics' peak timesteps {unknown[:5]} of variant {variant!r} are not among the "
                         f"capture's timesteps {observed[:5]}...: rerun timestep_stats[{variant}] on this capture")
    groups = _PromptGroups(prompts)
    blocks: list[tuple[range, Path]] = []
    wanted: set[int] = set()
    for index, first in enumerate(range(0, max(1, width), plan.block_features)):
        block = range(first, min(first + plan.block_features, width))
        channels = np.asarray([c for c in block if c in peak_of], dtype=np.int64)
        path = work / f"block_{index:05d}.parquet"
        if channels.size:
            columns = np.asarray([column_of[peak_of[int(c)]] for c in channels], dtype=np.int64)
            best = _best_of_block(store, variant, groups, channels, columns, plan.chunk_generations, half)
        else:
            best = pl.DataFrame(schema=BLOCK_SCHEMA)
        best.write_parquet(path)
        wanted.update(best["generation_id"].unique().to_list())
        blocks.append((block, path))
        del best  # else the next block is ranked while this one is still held: two blocks at the peak
    return blocks, wanted
