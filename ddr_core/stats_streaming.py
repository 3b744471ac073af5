"""Streaming pieces of :mod:`ddr_core.statistics`: a memory plan, running top examples, an ordered top-k writer.

The timestep statistics read a variant's dense activations ``(G, T, F)`` once, in chunks of generations,
and keep only accumulators whose size depends on the width ``F``, the number of timesteps ``T`` and
``n_examples``, never on the number of generations ``G``:

- :func:`plan_memory` turns ``memory_budget_mib`` into the chunk size (generations read at a time), the
  DuckDB ``memory_limit`` and a check that the fixed accumulators fit, raised before anything is written;
- :class:`TopExamples` keeps, per (timestep, channel), the ``n`` best rows seen so far (activation
  descending, ties to the lower generation id), the same rows as DuckDB's former window query over every
  top-k row, which held all ``G x T x top_k`` of them in memory;
- :class:`TopkWriter` appends the top-k rows to one Parquet file as they come, so they need no global sort
  when the batches come in generation order (the usual case); otherwise DuckDB sorts them out of core.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddr_core.activation_store import TOPK_SCHEMA

MIB = 2**20
# Interpreter and libraries (numpy, pyarrow, polars, duckdb, scipy) before any data: measured ~350 MiB
# in a bare process, more under Dagster; reserved out of the budget.
BASE_MIB = 512
# Peak bytes per dense value while a chunk is ranked: the float16 slice, its float32 copy, the NaN-free
# copy, the negated copy, argpartition's int64 indices and the tie masks (measured ~32, rounded up).
BYTES_PER_DENSE_VALUE = 40
# Per (timestep, channel): running maximum (float32), top-k count and frequency (int64, float64), and per
# example slot an activation (float32) and a generation id (int64).
BYTES_PER_CELL = 4 + 8 + 8
BYTES_PER_EXAMPLE_SLOT = 4 + 8
EMPTY_GENERATION = np.iinfo(np.int64).max
TOPK_FLUSH_ROWS = 1_000_000


class MemoryBudgetError(ValueError):
    """The statistics' fixed accumulators do not fit ``memory_budget_mib``; the message names the fix."""


@dataclass(frozen=True)
class MemoryPlan:
    """How one statistics run spends ``budget_mib``: generations per chunk and DuckDB's memory limit."""

    budget_mib: int
    fixed_mib: float
    chunk_generations: int
    duckdb_memory_mib: int

    @property
    def duckdb_memory_limit(self) -> str:
        return f"{self.duckdb_memory_mib}MB"


def plan_memory(budget_mib: int, width: int, n_timesteps: int, n_examples: int) -> MemoryPlan:
    """Split ``budget_mib`` (peak RSS of the whole process) between the fixed per-(timestep, channel)
    accumulators, one chunk of dense values and DuckDB; raise :class:`MemoryBudgetError` if the fixed part
    alone takes more than half of what is left after the interpreter's :data:`BASE_MIB`."""
    available = (budget_mib - BASE_MIB) * MIB
    cells = width * n_timesteps
    fixed = cells * (BYTES_PER_CELL + n_examples * BYTES_PER_EXAMPLE_SLOT)
    if available <= 0 or fixed > available / 2:
        needed = BASE_MIB + int(np.ceil(2 * fixed / MIB))
        raise MemoryBudgetError(
            f"timestep_stats needs about {fixed / MIB:.0f} MiB of accumulators for {width} channels x "
            f"{n_timesteps} timesteps x n_examples={n_examples}, more than half of memory_budget_mib={budget_mib} "
            f"after {BASE_MIB} MiB for the interpreter; raise memory_budget_mib to at least {needed} or lower "
            f"n_examples"
        )
    rest = available - fixed
    chunk_bytes = rest / 2
    chunk_generations = max(1, int(chunk_bytes // (cells * BYTES_PER_DENSE_VALUE)))
    duckdb_mib = max(64, int(rest / 4 / MIB))
    return MemoryPlan(budget_mib, fixed / MIB, chunk_generations, duckdb_mib)


class TopExamples:
    """Per (timestep column, channel) the ``n`` best rows seen so far: activation descending, ties to the
    lower generation id. Memory ``T x F x n x 12`` bytes whatever the number of generations."""

    def __init__(self, n_timesteps: int, width: int, n: int) -> None:
        self.width, self.n = width, n
        self.activation = np.full((n_timesteps * width, n), -np.inf, dtype=np.float32)
        self.generation = np.full((n_timesteps * width, n), EMPTY_GENERATION, dtype=np.int64)

    def add(self, columns: np.ndarray, channels: np.ndarray, activations: np.ndarray,
            generation_ids: np.ndarray) -> None:
        """Merge rows (timestep column, channel, activation, generation id); activations are finite."""
        if columns.size == 0:
            return
        keys = columns.astype(np.int64) * self.width + channels.astype(np.int64)
        activations = activations.astype(np.float32)
        generation_ids = generation_ids.astype(np.int64)
        # Only rows that beat the key's current n-th best can enter (most rows, once the slots are full).
        worst_activation, worst_generation = self.activation[keys, -1], self.generation[keys, -1]
        better = (activations > worst_activation) | (
            (activations == worst_activation) & (generation_ids < worst_generation))
        keys, activations, generation_ids = keys[better], activations[better], generation_ids[better]
        if keys.size == 0:
            return
        touched = np.unique(keys)
        all_keys = np.concatenate([np.repeat(touched, self.n), keys])
        all_activation = np.concatenate([self.activation[touched].reshape(-1), activations])
        all_generation = np.concatenate([self.generation[touched].reshape(-1), generation_ids])
        order = np.lexsort((all_generation, -all_activation, all_keys))
        sorted_keys = all_keys[order]
        starts = np.searchsorted(sorted_keys, touched)
        rank = np.arange(sorted_keys.size) - starts[np.searchsorted(touched, sorted_keys)]
        kept = order[rank < self.n]  # exactly n per touched key (the old slots, placeholders included)
        self.activation[touched] = all_activation[kept].reshape(touched.size, self.n)
        self.generation[touched] = all_generation[kept].reshape(touched.size, self.n)

    def table(self, observed: np.ndarray) -> pa.Table:
        """The kept rows: channel, timestep, rank, generation_id, activation (unordered, filled slots only)."""
        key, rank = np.nonzero(self.generation != EMPTY_GENERATION)
        return pa.table({
            "channel": (key % self.width).astype(np.int32),
            "timestep": np.asarray(observed, dtype=np.int64)[key // self.width],
            "rank": rank.astype(np.int32),
            "generation_id": self.generation[key, rank],
            "activation": self.activation[key, rank],
        })


class TopkWriter:
    """Append top-k tables (:data:`TOPK_SCHEMA`) to one Parquet file, ``TOPK_FLUSH_ROWS`` rows per row group;
    :attr:`ordered` stays true while the rows arrive in (generation_id, timestep descending, rank) order."""

    def __init__(self, path: Path, observed: np.ndarray) -> None:
        self.path = path
        self.ordered = bool(np.all(np.diff(np.asarray(observed, dtype=np.int64)) < 0))
        self._last_generation = -1 if self.ordered else None
        self._writer = pq.ParquetWriter(path, TOPK_SCHEMA, compression="zstd")
        self._buffer: list[pa.Table] = []
        self._rows = 0

    def write(self, table: pa.Table, generation_ids: np.ndarray) -> None:
        """``table``: rows of ``generation_ids`` (ascending within the chunk) in topk_table's order."""
        if self.ordered and generation_ids.size:
            if int(generation_ids[0]) <= self._last_generation or np.any(np.diff(generation_ids) <= 0):
                self.ordered = False
            self._last_generation = int(generation_ids[-1])
        self._buffer.append(table)
        self._rows += table.num_rows
        if self._rows >= TOPK_FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.concat_tables(self._buffer))
        self._buffer, self._rows = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()
