"""On-disk store of the activations recorded by one capture group.

A capture run generates images for a prompt set. At each recorded denoising timestep it keeps, for
every generation and every *variant* (raw layer channels, or the features of one SAE), each
channel's spatial-mean activation, for the conditional and the unconditional classifier-free-guidance
halves separately. The store is written batch by batch, every file atomically, and a batch counts as
finished only once its done marker exists, so an interrupted capture resumes at the first unfinished
batch.

Layout of one capture group ``root``::

    root/
      timesteps.json                         [981, 961, ..., 1]  recorded timesteps, denoising order
      generations.parquet                    assembled by finalize() from the parts below
      generations/batch_00000.parquet        the batch's generations (columns: GENERATION_COLUMNS)
      done/batch_00000.json                  written last: {"batch_index", "files": {relpath: bytes}, ...}
      <variant>/batches/batch_00000.safetensors
          generation_ids (g,) int64, timesteps (T,) int64,
          conditional (g, T, F) float16, unconditional (g, T, F) float16 (optional);
          metadata {"variant": name, "width": F, "batch_index": i}
      <variant>/topk/batch_00000.parquet     generation_id int64, timestep int64, rank int32 (0 = largest),
                                             channel int32, activation float32
                                             (top ``capture_top_k`` channels of the conditional half)
      <variant>/max/batch_00000.parquet      channel int32, timestep int64, max_activation float32,
                                             argmax_generation_id int64 (conditional half, over the batch)

Within a batch, generations are stored sorted by ``generation_id``. ``generation_id`` is global and
dense, ``prompt_index * num_images_per_prompt + image_index``. The Parquet parts can be queried with
DuckDB globs such as ``read_parquet('root/<variant>/topk/*.parquet')``; the globs contain only
finished batches once :meth:`ActivationStore.finalize` (or :meth:`ActivationStore.clean_unfinished`)
has run. The ``topk`` and ``max`` parts are conveniences that no stage reads: a capture with
``store_summaries: false`` leaves them out (its done markers say ``"summaries": false``).

All top-k rankings here and in :mod:`ddr_core.statistics` are computed on the stored float16 values
(cast to float32), ties broken by the lower channel index, so they agree with :meth:`iter_dense`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open
from safetensors.numpy import save_file

from ddr_core.atomic import atomic_path, atomic_write_json, is_temp_name, remove_temp_files
from ddr_core.paths import NAME_RULE, is_safe_name
from ddr_core.tensor_files import canonical_metadata, read_metadata

Half = Literal["conditional", "unconditional"]
HALVES: tuple[str, ...] = ("conditional", "unconditional")

GENERATION_COLUMNS: dict[str, pl.DataType] = {
    "generation_id": pl.Int64(),
    "prompt_index": pl.Int64(),
    "prompt": pl.String(),
    "image_index": pl.Int64(),
    "seed": pl.Int64(),
    "image_path": pl.String(),
    "batch_index": pl.Int64(),
}

TOPK_SCHEMA = pa.schema(
    [
        ("generation_id", pa.int64()),
        ("timestep", pa.int64()),
        ("rank", pa.int32()),
        ("channel", pa.int32()),
        ("activation", pa.float32()),
    ]
)
MAX_SCHEMA = pa.schema(
    [
        ("channel", pa.int32()),
        ("timestep", pa.int64()),
        ("max_activation", pa.float32()),
        ("argmax_generation_id", pa.int64()),
    ]
)

_BATCH_RE = re.compile(r"^batch_(\d{5,})\.(json|parquet|safetensors)$")
_RESERVED = {"generations", "done"}
FORMAT_VERSION = 1


class ActivationStoreError(ValueError):
    """The store or the data given to it is inconsistent; the message says what to fix."""


class NonFiniteActivationsError(ActivationStoreError):
    """Activations hold NaN or infinite values (a diverging model, NaN SAE weights, float16 overflow)."""


def check_finite(array: np.ndarray, variant: str, half: str, generation_ids: np.ndarray,
                 timesteps: np.ndarray, source: np.ndarray | None = None) -> None:
    """Raise :class:`NonFiniteActivationsError` naming the channels, generations and timesteps of every
    NaN / inf in ``array`` ``(g, T, F)``; ``source``: the values before a cast to ``array``'s dtype (tells a
    float16 overflow from a value that was already non-finite)."""
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    g_idx, t_idx, c_idx = np.nonzero(bad)
    values = array[bad]
    channels = np.unique(c_idx)
    counts = {"NaN": int(np.isnan(values).sum()), "+inf": int((values == np.inf).sum()),
              "-inf": int((values == -np.inf).sum())}
    overflow = source is not None and bool(np.isfinite(np.asarray(source)[bad]).all())
    cause = (f"the values exceed the {array.dtype} range (largest magnitude "
             f"{float(np.abs(np.asarray(source)[bad]).max()):.4g}): capture with dtype float32 or a smaller scale"
             if overflow else
             "the model or SAE produced them: check the SAE's weights (re-provision it), run in float32 "
             "(dtype: float32), or lower the guidance scale")
    per_channel = ", ".join(f"{int(c)}: {int((c_idx == c).sum())}" for c in channels[:20])
    raise NonFiniteActivationsError(
        f"variant {variant!r}, {half} half: {int(bad.sum())} non-finite activation(s) "
        f"({', '.join(f'{k} {v}' for k, v in counts.items() if v)}) in {len(channels)} channel(s) "
        f"[per channel {per_channel}{' ...' if len(channels) > 20 else ''}], generations "
        f"{sorted({int(generation_ids[i]) for i in g_idx})[:20]}, timesteps "
        f"{sorted({int(timesteps[i]) for i in t_idx}, reverse=True)[:20]}; {cause}. Nothing of this batch "
        f"was written.")


def batch_name(batch_index: int, suffix: str) -> str:
    """``batch_00042.<suffix>``."""
    return f"batch_{batch_index:05d}.{suffix}"


@dataclass
class VariantBatch:
    """One batch of one variant: spatial-mean activations per generation, timestep and channel.

    ``conditional``: ``(generations, timesteps, channels)``, a torch tensor or numpy array;
    ``unconditional``: same shape or ``None`` (no classifier-free guidance, or not recorded).
    """

    conditional: Any
    unconditional: Any | None = None


def to_numpy(array: Any, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A numpy copy/view of a torch tensor or array-like, cast to ``dtype`` (no torch import needed)."""
    if hasattr(array, "detach"):  # torch.Tensor
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":
            array = array.float()
        array = array.numpy()
    with np.errstate(over="ignore"):  # float16 overflow becomes inf, which write_batch reports by channel
        return np.asarray(array, dtype=dtype)


def top_k_channels(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest channels of every row, ordered by activation (descending), ties by channel.

    Args:
        values: ``(rows, channels)`` float array. NaN ranks below every number.
        k: ``1 <= k <= channels``.

    Returns:
        ``(indices, activations)``, both ``(rows, k)``; ``indices`` int64.
    """
    if values.ndim != 2:
        raise ValueError(f"top_k_channels expects (rows, channels), got shape {values.shape}")
    rows, width = values.shape
    if not 1 <= k <= width:
        raise ValueError(f"top_k must be between 1 and the width {width}, got {k}")
    nan = np.isnan(values)
    if nan.any():  # a copy only when needed: at 20,480 channels every byte per value counts
        values = np.where(nan, -np.inf, values)
    del nan
    if rows == 0:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=values.dtype)
    if k == width:
        selected = np.broadcast_to(np.arange(width), (rows, width))
    else:
        candidates = np.argpartition(values, width - k, axis=1)[:, width - k:]  # the k largest, ties arbitrary
        kth_value = np.take_along_axis(values, candidates, axis=1).min(axis=1, keepdims=True)
        del candidates
        above = values > kth_value
        ties = values == kth_value
        needed = k - above.sum(axis=1)
        chosen = above | ties
        # rows with more ties at the k-th value than places left keep the lowest channels among them (the
        # cumulative count is computed for those rows only: most rows have no surplus tie)
        surplus = np.nonzero(ties.sum(axis=1) > needed)[0]
        if surplus.size:
            chosen[surplus] = above[surplus] | (
                ties[surplus] & (np.cumsum(ties[surplus], axis=1) <= needed[surplus, None]))
        del above, ties
        selected = np.nonzero(chosen)[1].reshape(rows, k)  # ascending channel within each row
    selected_values = np.take_along_axis(values, selected, axis=1)
    order = np.argsort(-selected_values, axis=1, kind="stable")  # stable keeps lower channel first
    indices = np.take_along_axis(selected, order, axis=1).astype(np.int64)
    return indices, np.take_along_axis(selected_values, order, axis=1)


def topk_table(generation_ids: np.ndarray, timesteps: np.ndarray, activations: np.ndarray, k: int) -> pa.Table:
    """Top-``k`` rows for a ``(g, T, F)`` block as a table with :data:`TOPK_SCHEMA`.

    Row order: generation (as given), then timestep (as given), then rank.
    """
    g, t, width = activations.shape
    indices, values = top_k_channels(activations.reshape(g * t, width), k)
    return pa.table(
        {
            "generation_id": np.repeat(np.asarray(generation_ids, dtype=np.int64), t * k),
            "timestep": np.tile(np.repeat(np.asarray(timesteps, dtype=np.int64), k), g),
            "rank": np.tile(np.arange(k, dtype=np.int32), g * t),
            "channel": indices.reshape(-1).astype(np.int32),
            "activation": values.reshape(-1).astype(np.float32),
        },
        schema=TOPK_SCHEMA,
    )


def _max_table(generation_ids: np.ndarray, timesteps: np.ndarray, activations: np.ndarray) -> pa.Table:
    """Per (channel, timestep) maximum over the batch and the generation reaching it (first wins)."""
    g, t, width = activations.shape
    safe = np.where(np.isnan(activations), -np.inf, activations)
    argmax = safe.argmax(axis=0)  # (T, F)
    maximum = np.take_along_axis(safe, argmax[None], axis=0)[0]  # (T, F)
    return pa.table(
        {
            "channel": np.tile(np.arange(width, dtype=np.int32), t),
            "timestep": np.repeat(np.asarray(timesteps, dtype=np.int64), width),
            "max_activation": maximum.reshape(-1).astype(np.float32),
            "argmax_generation_id": np.asarray(generation_ids, dtype=np.int64)[argmax.reshape(-1)],
        },
        schema=MAX_SCHEMA,
    )


def _write_parquet(table: pa.Table | pl.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        if isinstance(table, pl.DataFrame):
            table.write_parquet(tmp, compression="zstd", statistics=True)
        else:
            pq.write_table(table, tmp, compression="zstd")


class ActivationStore:
    """Reader and writer of one capture group's activations under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def timesteps_path(self) -> Path:
        return self.root / "timesteps.json"

    @property
    def generations_path(self) -> Path:
        return self.root / "generations.parquet"

    def done_path(self, batch_index: int) -> Path:
        return self.root / "done" / batch_name(batch_index, "json")

    def generations_part_path(self, batch_index: int) -> Path:
        return self.root / "generations" / batch_name(batch_index, "parquet")

    def dense_path(self, variant: str, batch_index: int) -> Path:
        return self.root / variant / "batches" / batch_name(batch_index, "safetensors")

    def topk_path(self, variant: str, batch_index: int) -> Path:
        return self.root / variant / "topk" / batch_name(batch_index, "parquet")

    def max_path(self, variant: str, batch_index: int) -> Path:
        return self.root / variant / "max" / batch_name(batch_index, "parquet")

    def topk_glob(self, variant: str) -> str:
        """DuckDB glob over the variant's capture-time top-k parts."""
        return str(self.root / variant / "topk" / "*.parquet")

    def max_glob(self, variant: str) -> str:
        """DuckDB glob over the variant's per-batch maxima."""
        return str(self.root / variant / "max" / "*.parquet")

    # ------------------------------------------------------------------ writing
    def write_batch(
        self,
        batch_index: int,
        generations: Sequence[Mapping[str, Any]] | pl.DataFrame,
        timesteps: Sequence[int] | np.ndarray,
        per_variant: Mapping[str, VariantBatch],
        capture_top_k: int = 64,
        summaries: bool = True,
    ) -> dict[str, Any]:
        """Write one batch: dense activations, top-k and maxima per variant, generations, done marker.

        Args:
            batch_index: ``>= 0``; file names use it zero-padded to 5 digits.
            generations: ``g`` rows with the columns of :data:`GENERATION_COLUMNS` (``batch_index`` may
                be omitted; it is filled in). Row ``i`` describes ``conditional[i]`` of every variant.
            timesteps: the ``T`` recorded timesteps in denoising order; identical for every batch.
            per_variant: variant name -> :class:`VariantBatch` with ``(g, T, F)`` activations.
            capture_top_k: channels kept per (generation, timestep) in ``<variant>/topk`` (capped at F).
            summaries: also write ``<variant>/topk`` and ``<variant>/max`` (conveniences for DuckDB queries;
                no stage reads them, ``timestep_stats`` recomputes both from the dense values). False saves
                about ``T x F x 5 / g`` bytes per generation of ``max`` (a third of the dense bytes at batch 4).

        Every file is written atomically and the done marker last. Writing a batch that is already
        finished first removes its done marker, so a crash halfway leaves it unfinished, never mixed;
        the same input gives the same files (idempotent). Returns the done marker's content.
        """
        if batch_index < 0:
            raise ActivationStoreError(f"batch_index must be >= 0, got {batch_index}")
        if not per_variant:
            raise ActivationStoreError("per_variant is empty: give at least one variant's activations")
        if capture_top_k < 1:
            raise ActivationStoreError(f"capture_top_k must be >= 1, got {capture_top_k}")
        timestep_array = np.asarray(timesteps, dtype=np.int64).reshape(-1)
        self._check_timesteps(timestep_array)
        frame = self._generations_frame(generations, batch_index)
        order = np.argsort(frame["generation_id"].to_numpy(), kind="stable")
        frame = frame.sort("generation_id")  # ids are unique, so this is the same permutation as `order`
        generation_ids = frame["generation_id"].to_numpy().astype(np.int64)
        g, t = len(frame), len(timestep_array)

        prepared: dict[str, dict[str, np.ndarray]] = {}
        for variant, batch in per_variant.items():
            self._check_variant_name(variant)
            if not isinstance(batch, VariantBatch):
                raise ActivationStoreError(
                    f"per_variant[{variant!r}] must be a VariantBatch(conditional, unconditional), "
                    f"got {type(batch).__name__}"
                )
            tensors: dict[str, np.ndarray] = {}
            for half in HALVES:
                data = getattr(batch, half)
                if data is None:
                    if half == "conditional":
                        raise ActivationStoreError(f"variant {variant!r}: the conditional half is required")
                    continue
                array = to_numpy(data, np.float16)
                if array.ndim != 3 or array.shape[:2] != (g, t):
                    raise ActivationStoreError(
                        f"variant {variant!r}, {half}: expected shape (generations={g}, timesteps={t}, "
                        f"channels), got {tuple(array.shape)}"
                    )
                tensors[half] = np.ascontiguousarray(array[order])
                if not np.isfinite(tensors[half]).all():
                    check_finite(tensors[half], variant, half, generation_ids, timestep_array,
                                 source=to_numpy(data, np.float32)[order])
            width = tensors["conditional"].shape[2]
            if "unconditional" in tensors and tensors["unconditional"].shape[2] != width:
                raise ActivationStoreError(
                    f"variant {variant!r}: unconditional width {tensors['unconditional'].shape[2]} "
                    f"differs from conditional width {width}"
                )
            known = self._known_width(variant, exclude_batch=batch_index)
            if known is not None and known != width:
                raise ActivationStoreError(
                    f"variant {variant!r}: width {width} differs from the width {known} of the batches "
                    f"already stored in {self.root / variant}; use a new capture folder"
                )
            prepared[variant] = tensors

        # Un-finish first, so that a crash while rewriting never leaves a mix of old and new files.
        done_path = self.done_path(batch_index)
        done_path.unlink(missing_ok=True)
        if not self.timesteps_path.exists():
            atomic_write_json(self.timesteps_path, [int(x) for x in timestep_array])

        files: list[Path] = []
        for variant, tensors in prepared.items():
            width = tensors["conditional"].shape[2]
            dense_path = self.dense_path(variant, batch_index)
            with atomic_path(dense_path) as tmp:
                save_file(
                    {"generation_ids": generation_ids, "timesteps": timestep_array, **tensors},
                    str(tmp),
                    metadata=canonical_metadata({"variant": variant, "width": str(width), "batch_index": str(batch_index)}),
                )
            files.append(dense_path)
            if not summaries:
                continue
            conditional = tensors["conditional"].astype(np.float32)
            k = min(capture_top_k, width)
            _write_parquet(topk_table(generation_ids, timestep_array, conditional, k),
                           self.topk_path(variant, batch_index))
            files.append(self.topk_path(variant, batch_index))
            _write_parquet(_max_table(generation_ids, timestep_array, conditional),
                           self.max_path(variant, batch_index))
            files.append(self.max_path(variant, batch_index))

        _write_parquet(frame, self.generations_part_path(batch_index))
        files.append(self.generations_part_path(batch_index))

        marker = {
            "format_version": FORMAT_VERSION,
            "batch_index": int(batch_index),
            "generation_ids": [int(generation_ids.min()), int(generation_ids.max())] if g else [],
            "num_generations": g,
            "num_timesteps": t,
            "capture_top_k": int(capture_top_k),
            "summaries": bool(summaries),
            "variants": {v: int(ts["conditional"].shape[2]) for v, ts in prepared.items()},
            "halves": {v: sorted(ts) for v, ts in prepared.items()},
            "files": {p.relative_to(self.root).as_posix(): p.stat().st_size for p in files},
        }
        atomic_write_json(done_path, marker)
        return marker

    def _check_timesteps(self, timesteps: np.ndarray) -> None:
        if timesteps.size == 0:
            raise ActivationStoreError("timesteps is empty")
        if len(np.unique(timesteps)) != timesteps.size:
            raise ActivationStoreError(f"timesteps contain duplicates: {timesteps.tolist()}")
        if self.timesteps_path.exists():
            stored = self.timesteps()
            if stored.tolist() != timesteps.tolist():
                raise ActivationStoreError(
                    f"timesteps {timesteps.tolist()} differ from those already stored in "
                    f"{self.timesteps_path} ({stored.tolist()}); every batch of a capture must record the "
                    f"same timesteps, so use a new capture folder"
                )

    @staticmethod
    def _check_variant_name(variant: str) -> None:
        if not is_safe_name(variant) or variant in _RESERVED:
            raise ActivationStoreError(
                f"variant name {variant!r} is not a safe folder name: use {NAME_RULE}; not {sorted(_RESERVED)}"
            )

    @staticmethod
    def _generations_frame(
        generations: Sequence[Mapping[str, Any]] | pl.DataFrame, batch_index: int
    ) -> pl.DataFrame:
        frame = generations if isinstance(generations, pl.DataFrame) else pl.DataFrame(list(generations))
        if "batch_index" not in frame.columns:
            frame = frame.with_columns(pl.lit(batch_index).alias("batch_index"))
        missing = [c for c in GENERATION_COLUMNS if c not in frame.columns]
        if missing:
            raise ActivationStoreError(
                f"generations lack the columns {missing}; each row needs {list(GENERATION_COLUMNS)}"
            )
        frame = frame.select(
            [pl.col(name).cast(dtype, strict=True) for name, dtype in GENERATION_COLUMNS.items()]
        )
        if frame.height == 0:
            raise ActivationStoreError("generations is empty: a batch needs at least one generation")
        if frame["generation_id"].n_unique() != frame.height:
            raise ActivationStoreError("generation_id values repeat within the batch")
        if (frame["batch_index"] != batch_index).any():
            raise ActivationStoreError(f"generations carry a batch_index other than {batch_index}")
        return frame

    # ------------------------------------------------------------------ reading
    def timesteps(self) -> np.ndarray:
        """``(T,)`` int64: the recorded timesteps in denoising order."""
        if not self.timesteps_path.exists():
            raise ActivationStoreError(f"{self.timesteps_path} is missing: no batch was written to {self.root}")
        return np.asarray(json.loads(self.timesteps_path.read_text()), dtype=np.int64)

    def _read_marker(self, batch_index: int) -> dict[str, Any] | None:
        path = self.done_path(batch_index)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _marker_valid(self, marker: dict[str, Any]) -> bool:
        for relative, size in marker.get("files", {}).items():
            path = self.root / relative
            try:
                if path.stat().st_size != size:
                    return False
            except FileNotFoundError:
                return False
        return True

    def finished_batches(self) -> set[int]:
        """Indices of batches whose done marker exists and lists files that all exist with their sizes.

        Temporary files and files of unfinished batches are ignored (see :meth:`clean_unfinished`).
        """
        done_dir = self.root / "done"
        if not done_dir.is_dir():
            return set()
        finished: set[int] = set()
        for path in done_dir.iterdir():
            match = _BATCH_RE.match(path.name)
            if not match or match.group(2) != "json":
                continue
            marker = self._read_marker(int(match.group(1)))
            if marker is not None and self._marker_valid(marker):
                finished.add(int(match.group(1)))
        return finished

    def _markers(self) -> dict[int, dict[str, Any]]:
        markers = {}
        for index in sorted(self.finished_batches()):
            marker = self._read_marker(index)
            if marker is not None:
                markers[index] = marker
        return markers

    def clean_unfinished(self) -> list[Path]:
        """Delete temporaries and batch files without a valid done marker; returns what was removed.

        Call only while no writer is running on this store (e.g. before resuming a capture).
        """
        removed = remove_temp_files(self.root)
        finished = self.finished_batches()
        directories = [self.root / "generations", self.root / "done"]
        for variant_dir in self.root.iterdir() if self.root.is_dir() else []:
            if variant_dir.is_dir() and variant_dir.name not in _RESERVED:
                directories += [variant_dir / "batches", variant_dir / "topk", variant_dir / "max"]
        for directory in directories:
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                match = _BATCH_RE.match(path.name)
                if match and int(match.group(1)) not in finished and not is_temp_name(path.name):
                    path.unlink()
                    removed.append(path)
        return removed

    def variants(self) -> list[str]:
        """Sorted names of the variants present in the finished batches."""
        names: set[str] = set()
        for marker in self._markers().values():
            names.update(marker.get("variants", {}))
        return sorted(names)

    def _known_width(self, variant: str, exclude_batch: int | None = None) -> int | None:
        for index, marker in self._markers().items():
            if index != exclude_batch and variant in marker.get("variants", {}):
                return int(marker["variants"][variant])
        return None

    def width(self, variant: str) -> int:
        """Number of channels ``F`` of ``variant`` (from its dense files' metadata)."""
        for index in sorted(self.finished_batches()):
            path = self.dense_path(variant, index)
            if path.exists():
                with safe_open(str(path), framework="numpy") as handle:
                    return int(read_metadata(handle)["width"])
        raise ActivationStoreError(
            f"variant {variant!r} has no finished batch in {self.root}; known variants: {self.variants()}"
        )

    def _dense_files(self, variant: str, half: Half) -> Iterator[Any]:
        """Open each finished batch's dense file of ``variant`` in batch-index order (checked: ``half`` is in it)."""
        if half not in HALVES:
            raise ActivationStoreError(f"half must be one of {HALVES}, got {half!r}")
        batches = [i for i, m in self._markers().items() if variant in m.get("variants", {})]
        if not batches:
            raise ActivationStoreError(
                f"variant {variant!r} has no finished batch in {self.root}; known variants: {self.variants()}"
            )
        for index in batches:
            path = self.dense_path(variant, index)
            with safe_open(str(path), framework="numpy") as handle:
                if half not in handle.keys():
                    raise ActivationStoreError(
                        f"{path} has no {half!r} activations (the capture did not record that half: guidance "
                        "was off (guidance_scale <= 1, e.g. SDXL-Turbo at guidance_scale 0), keep_unconditional was "
                        "false, or the model has no classifier-free guidance at all, as FLUX.1); analyse "
                        "half='conditional'"
                    )
                yield handle

    def iter_dense(
        self, variant: str, half: Half = "conditional", max_generations: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(generation_ids (g,), timesteps (T,), activations (g, T, F) float32)`` per finished batch.

        Batches come in batch-index order, one at a time (memory is bounded by one batch). With
        ``max_generations`` a batch comes in consecutive chunks of at most that many generations, each read
        from the file on its own (memory is bounded by one chunk, whatever the capture's batch size).
        """
        if max_generations is not None and max_generations < 1:
            raise ActivationStoreError(f"max_generations must be >= 1 or None, got {max_generations}")
        for handle in self._dense_files(variant, half):
            generation_ids = handle.get_tensor("generation_ids").astype(np.int64)
            timesteps = handle.get_tensor("timesteps").astype(np.int64)
            if max_generations is None:
                yield generation_ids, timesteps, handle.get_tensor(half).astype(np.float32)
                continue
            values = handle.get_slice(half)
            for start in range(0, len(generation_ids), max_generations):
                stop = min(start + max_generations, len(generation_ids))
                yield generation_ids[start:stop], timesteps, values[start:stop].astype(np.float32)

    def iter_channel_values(
        self, variant: str, channels: Sequence[int], columns: Sequence[int], half: Half = "conditional",
        max_generations: int = 1024,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(generation_ids (g,), values (g, len(channels)) float32)``: channel ``channels[j]`` at timestep
        column ``columns[j]`` (an index into :meth:`timesteps`), the values :meth:`iter_dense` has there. Only
        those are read from the files (per distinct column, one ``(g, span)`` slice over the span of its
        channels), so memory and reading grow with the block of channels, not with the variant's width.
        """
        if max_generations < 1:
            raise ActivationStoreError(f"max_generations must be >= 1, got {max_generations}")
        channels = np.asarray(channels, dtype=np.int64)
        columns = np.asarray(columns, dtype=np.int64)
        if channels.shape != columns.shape:
            raise ActivationStoreError(f"{channels.size} channels for {columns.size} timestep columns")
        for handle in self._dense_files(variant, half):
            generation_ids = handle.get_tensor("generation_ids").astype(np.int64)
            values = handle.get_slice(half)
            _, n_timesteps, width = values.get_shape()
            if channels.size and not (0 <= channels.min() and channels.max() < width and 0 <= columns.min()
                                      and columns.max() < n_timesteps):
                raise ActivationStoreError(f"channels {channels.min()}..{channels.max()} at timestep columns "
                                           f"{columns.min()}..{columns.max()} are outside {variant!r}'s "
                                           f"{n_timesteps} timesteps x {width} channels")
            for first in range(0, len(generation_ids), max_generations):
                last = min(first + max_generations, len(generation_ids))
                out = np.empty((last - first, channels.size), dtype=np.float32)
                for column in np.unique(columns):
                    picked = np.flatnonzero(columns == column)
                    low, high = int(channels[picked].min()), int(channels[picked].max()) + 1
                    part = values[first:last, int(column):int(column) + 1, low:high]
                    out[:, picked] = part[:, 0, channels[picked] - low].astype(np.float32)
                yield generation_ids[first:last], out

    def read_generations(self) -> pl.DataFrame:
        """The generations of the finished batches, sorted by ``generation_id`` (from the parts)."""
        parts = [self.generations_part_path(i) for i in sorted(self.finished_batches())]
        if not parts:
            return pl.DataFrame(schema=GENERATION_COLUMNS)
        frame = pl.concat([pl.read_parquet(p) for p in parts]).sort("generation_id")
        duplicated = frame.filter(pl.col("generation_id").is_duplicated())
        if duplicated.height:
            raise ActivationStoreError(
                "generation_id values appear in several batches: "
                f"{duplicated.select('generation_id', 'batch_index').head(10).to_dicts()}"
            )
        return frame

    def finalize(self) -> dict[str, Any]:
        """Remove leftovers of unfinished batches and assemble ``generations.parquet``; return a summary.

        Summary: ``generations``, ``batches``, ``missing_batches`` (gaps in 0..max), ``dense_ids``
        (whether ids are exactly 0..G-1), ``timesteps``, ``channels`` per variant, ``bytes`` on disk.
        """
        self.clean_unfinished()
        frame = self.read_generations()
        if frame.height == 0:
            raise ActivationStoreError(f"no finished batch in {self.root}: nothing to finalize")
        _write_parquet(frame, self.generations_path)
        finished = sorted(self.finished_batches())
        ids = frame["generation_id"].to_numpy()
        total_bytes = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return {
            "root": str(self.root),
            "generations": int(frame.height),
            "batches": len(finished),
            "missing_batches": sorted(set(range(finished[-1] + 1)) - set(finished)),
            "dense_ids": bool(np.array_equal(ids, np.arange(len(ids)))),
            "timesteps": [int(x) for x in self.timesteps()],
            "channels": {v: self.width(v) for v in self.variants()},
            "bytes": int(total_bytes),
        }
