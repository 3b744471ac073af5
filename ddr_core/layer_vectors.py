"""Per-position channel vectors of a UNet layer, kept during generation (the training data of an SAE).

SAeUron trains on the channel vector of *every spatial position* of the hooked block's output, at the
denoising timesteps of real generations (all of them, or every n-th). :func:`collect_layer_vectors` is a
forward hook on the layer (a context manager that always removes itself) that keeps those vectors during a
pipeline call: ``(n, channels)`` rows with, for each row, its batch row, timestep, CFG half and position.
:func:`write_vector_batch` writes one generation batch of them as a safetensors file; :func:`load_vectors`
reads a folder of such files back. The ``activations`` stage calls both around its generation when
``CaptureConfig.sae_vectors`` is on; :mod:`ddr_core.sae_training` trains on what they wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ddr_core.atomic import atomic_path
from ddr_core.hooks import HookPoint, TimestepTracker, activation_tokens, as_hook_point
from ddr_core.tensor_files import canonical_metadata, read_metadata

VECTORS_DIRNAME = "sae_vectors"
"""Sub-folder of a capture group's activations folder holding the collected vectors."""
VECTORS_FORMAT = "ddr.sae_vectors/1"
_BATCH_FILE_RE = re.compile(r"^batch_(\d{5,})\.safetensors$")
HALF_UNCONDITIONAL, HALF_CONDITIONAL = 0, 1


# --------------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------------


class VectorSamplingConfig(BaseModel):
    """Which per-position vectors of the layer are kept during generation.

    Defaults keep everything (SAeUron's choice): every position, every denoising step, both CFG
    halves. For a large layer (SD 1.x: 1280 channels x 256 positions x 50 steps per image) keep a
    random subset of positions per call and/or every n-th step.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    positions_per_call: int | None = Field(
        None, ge=1, description="positions kept per image and layer call, drawn at random; None: all")
    every_n_timesteps: int = Field(1, ge=1, description="keep the layer calls 0, n, 2n, ... of each generation")
    halves: Literal["both", "conditional"] = Field(
        "both", description="CFG halves kept ('both' as SAeUron); without guidance there is one half")
    seed: int = Field(0, ge=0, description="seed of the position draws (with the generation id and step)")
    dtype: Literal["float16", "float32"] = Field("float16", description="stored dtype of the vectors")

    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self.dtype == "float16" else torch.float32


@dataclass
class LayerVectors:
    """Vectors kept by :func:`collect_layer_vectors` during one or more pipeline calls.

    After :meth:`stacked`: ``vectors (n, channels)``, and per row ``rows (n,)`` (the batch row of the
    generation, ``0..batch-1``), ``timesteps (n,)``, ``halves (n,)`` (0 unconditional, 1 conditional),
    ``positions (n,)`` (row-major spatial index), ``steps (n,)`` (the layer call index).
    """

    sampling: VectorSamplingConfig
    _parts: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {
        name: [] for name in ("vectors", "rows", "timesteps", "halves", "positions", "steps")}, repr=False)
    calls: int = 0

    def __len__(self) -> int:
        return sum(int(part.shape[0]) for part in self._parts["vectors"])

    def stacked(self) -> dict[str, torch.Tensor]:
        """The kept vectors and their row metadata as CPU tensors (see the class docstring)."""
        dtypes = {"rows": torch.int64, "timesteps": torch.int64, "halves": torch.int8,
                  "positions": torch.int32, "steps": torch.int32}
        out: dict[str, torch.Tensor] = {}
        for name, parts in self._parts.items():
            if parts:
                out[name] = torch.cat(parts)
            elif name == "vectors":
                out[name] = torch.zeros((0, 0), dtype=self.sampling.torch_dtype())
            else:
                out[name] = torch.zeros(0, dtype=dtypes[name])
        return out


def _position_draw(seed: int, generation_id: int, step: int, half: int, n_positions: int, keep: int) -> torch.Tensor:
    """``keep`` distinct positions of ``n_positions``, a function of its arguments only (sorted)."""
    state = np.random.SeedSequence([seed, generation_id, step, half]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(n_positions, generator=generator)[:keep].sort().values


@contextmanager
def collect_layer_vectors(
    layer: nn.Module | HookPoint,
    tracker: TimestepTracker,
    cfg: bool,
    sampling: VectorSamplingConfig | None = None,
    generation_ids: Sequence[int] | None = None,
) -> Iterator[LayerVectors]:
    """Keep the per-position channel vectors of ``layer`` at every call of a generation.

    Args:
        layer: hook point (or module whose output is read): ``(B, C, H, W)`` or ``(B, HW, C)``.
        tracker: active :class:`~ddr_core.hooks.TimestepTracker` on the UNet.
        cfg: whether the layer's batch is ``[unconditional; conditional]`` (guidance on).
        sampling: what to keep (default: everything).
        generation_ids: global id of each batch row; the position draws depend on it (and on the
            seed and step only), so a resumed or re-batched capture keeps the same vectors.

    Yields:
        A :class:`LayerVectors`, filled while the block runs (detached, CPU, ``sampling.dtype``).
    """
    sampling = sampling or VectorSamplingConfig()
    recorded = LayerVectors(sampling=sampling)
    store_dtype = sampling.torch_dtype()

    point = as_hook_point(layer)

    def hook(args: tuple, kwargs: dict, output: Any) -> None:
        step = recorded.calls
        recorded.calls += 1
        if step % sampling.every_n_timesteps:
            return
        timestep = tracker.require_current()
        with torch.no_grad():
            tokens = activation_tokens(point.read(args, kwargs, output)).detach()  # (L, N, C)
            if cfg:
                if tokens.shape[0] % 2:
                    raise ValueError(f"collect_layer_vectors(cfg=True) got an odd layer batch of {tokens.shape[0]}; "
                                     "pass cfg=False when guidance_scale <= 1.")
                unconditional, conditional = tokens.chunk(2)
                halves = [(HALF_CONDITIONAL, conditional)]
                if sampling.halves == "both":
                    halves.insert(0, (HALF_UNCONDITIONAL, unconditional))
            else:
                halves = [(HALF_CONDITIONAL, tokens)]
            batch, n_positions, _ = halves[0][1].shape
            ids = list(range(batch)) if generation_ids is None else [int(g) for g in generation_ids]
            if len(ids) != batch:
                raise ValueError(f"collect_layer_vectors got {len(ids)} generation ids for a batch of {batch}.")
            keep = n_positions if sampling.positions_per_call is None else min(sampling.positions_per_call,
                                                                               n_positions)
            drawn = [[torch.arange(n_positions) if keep == n_positions
                      else _position_draw(sampling.seed, ids[row], step, half, n_positions, keep)
                      for row in range(batch)] for half, _ in halves]
            # every row and half of this step go to the CPU in one copy (on a GPU one sync per step, not one per
            # row and half); the positions go up without waiting for the GPU
            index = torch.stack([torch.stack(rows) for rows in drawn]).to(tokens.device, non_blocking=True)
            picked = torch.stack([half_tokens[torch.arange(batch, device=tokens.device)[:, None], index[h]]
                                  for h, (_, half_tokens) in enumerate(halves)])  # (halves, batch, keep, C)
            picked = picked.to("cpu", store_dtype)
            for h, (half, _) in enumerate(halves):
                for row in range(batch):
                    positions = drawn[h][row]
                    recorded._parts["vectors"].append(picked[h, row])
                    recorded._parts["rows"].append(torch.full((keep,), row, dtype=torch.int64))
                    recorded._parts["timesteps"].append(torch.full((keep,), timestep, dtype=torch.int64))
                    recorded._parts["halves"].append(torch.full((keep,), half, dtype=torch.int8))
                    recorded._parts["positions"].append(positions.to(torch.int32))
                    recorded._parts["steps"].append(torch.full((keep,), step, dtype=torch.int32))

    handle = point.register(hook)
    try:
        yield recorded
    finally:
        handle.remove()


def maybe_collect_layer_vectors(
    layer: nn.Module | HookPoint,
    tracker: TimestepTracker,
    cfg: bool,
    sampling: VectorSamplingConfig | None,
    generation_ids: Sequence[int] | None = None,
):
    """:func:`collect_layer_vectors`, or a no-op context yielding ``None`` when ``sampling`` is ``None``."""
    if sampling is None:
        return nullcontext(None)
    return collect_layer_vectors(layer, tracker, cfg, sampling, generation_ids)


def vector_batch_path(vectors_dir: str | Path, batch_index: int) -> Path:
    """``<vectors_dir>/batch_<index:05d>.safetensors``."""
    return Path(vectors_dir) / f"batch_{int(batch_index):05d}.safetensors"


def write_vector_batch(
    vectors_dir: str | Path,
    batch_index: int,
    recorded: LayerVectors,
    generation_ids: Sequence[int],
    layer_name: str,
) -> Path:
    """Write one generation batch of collected vectors atomically; returns the file.

    File ``batch_<index:05d>.safetensors``: ``vectors (n, channels)`` float16/32 and per row
    ``generation_ids (n,) int64``, ``timesteps (n,) int64``, ``halves (n,) int8``,
    ``positions (n,) int32``, ``steps (n,) int32``; string metadata ``format``, ``layer``, ``width``,
    ``sampling`` (JSON). Rewriting a batch with the same generations gives the same file.
    """
    data = recorded.stacked()
    ids = torch.as_tensor([int(g) for g in generation_ids], dtype=torch.int64)
    if len(data["rows"]) and int(data["rows"].max()) >= len(ids):
        raise ValueError(f"the recorded vectors name batch row {int(data['rows'].max())} but only "
                         f"{len(ids)} generation ids were given")
    width = int(data["vectors"].shape[1]) if data["vectors"].ndim == 2 else 0
    tensors = {
        "vectors": data["vectors"].contiguous(),
        "generation_ids": ids[data["rows"]] if len(data["rows"]) else torch.zeros(0, dtype=torch.int64),
        "timesteps": data["timesteps"], "halves": data["halves"],
        "positions": data["positions"], "steps": data["steps"],
    }
    path = vector_batch_path(vectors_dir, batch_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=canonical_metadata({
            "format": VECTORS_FORMAT, "layer": layer_name, "width": str(width),
            "sampling": recorded.sampling.model_dump_json(), "batch_index": str(int(batch_index)),
        }))
    return path


def resolve_vectors_dir(path: str | Path) -> Path:
    """A folder of vector batches: ``path`` itself, or ``path/sae_vectors`` (a capture's folder).

    Raises:
        FileNotFoundError: naming both places looked at and how to create the vectors.
    """
    path = Path(path)
    for candidate in (path, path / VECTORS_DIRNAME):
        if candidate.is_dir() and any(_BATCH_FILE_RE.match(p.name) for p in candidate.iterdir()):
            return candidate
    raise FileNotFoundError(
        f"no vector batches (batch_*.safetensors) in {path} or {path / VECTORS_DIRNAME}; collect them with "
        f"`python -m ddr_core.sae_training collect ...` or a capture run with SAE vectors switched on")


@dataclass
class VectorSet:
    """Vectors read by :func:`load_vectors`: ``vectors (n, channels)`` float32 and per-row metadata."""

    vectors: torch.Tensor
    generation_ids: torch.Tensor
    timesteps: torch.Tensor
    layer: str
    files: list[str]

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


def load_vectors(vectors_dirs: Sequence[str | Path], layer_name: str | None = None) -> VectorSet:
    """Read every vector batch of the given folders (batch-index order, folders in the given order).

    Raises:
        FileNotFoundError: a folder holds no batches.
        ValueError: files of different layers or widths, or not of this format.
    """
    vectors, ids, timesteps, files = [], [], [], []
    layer: str | None = layer_name
    width: int | None = None
    for folder in vectors_dirs:
        folder = resolve_vectors_dir(folder)
        paths = sorted((p for p in folder.iterdir() if _BATCH_FILE_RE.match(p.name)), key=lambda p: p.name)
        for path in paths:
            with safe_open(str(path), framework="pt") as handle:
                meta = read_metadata(handle)
                if meta.get("format") != VECTORS_FORMAT:
                    raise ValueError(f"{path} is not a {VECTORS_FORMAT} file (format {meta.get('format')!r})")
                if layer is not None and meta.get("layer") != layer:
                    raise ValueError(f"{path} holds vectors of layer {meta.get('layer')!r}, not {layer!r}; "
                                     f"train one SAE per layer")
                layer = meta.get("layer")
                block = handle.get_tensor("vectors")
                if block.shape[0] == 0:
                    continue
                if width is not None and block.shape[1] != width:
                    raise ValueError(f"{path} has width {block.shape[1]}, earlier files {width}")
                width = int(block.shape[1])
                vectors.append(block.float())
                ids.append(handle.get_tensor("generation_ids"))
                timesteps.append(handle.get_tensor("timesteps"))
                files.append(str(path))
    if not vectors:
        raise ValueError(f"the vector batches in {list(map(str, vectors_dirs))} hold no vectors")
    return VectorSet(torch.cat(vectors), torch.cat(ids), torch.cat(timesteps), layer or "", files)


