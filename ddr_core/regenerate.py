"""Regenerate captured generations from their recorded seed and prompt (:func:`regenerate_latents`).

A capture (:mod:`ddr_core.activations`) records for every generation its prompt and seed (``generations``
table) and, in ``capture_plan.json``, the size, number of denoising steps and guidance scale it was made
with; a generation's starting noise depends only on its seed (:meth:`ModelFamily.initial_latents`), so running
the model family's ``generate`` again on these gives the same generation (up to the float rounding of
batched kernels). This module returns its latents at a chosen denoising step:

- ``step=None``: the final (clean) latents, those the capture decoded into its image;
- ``step=k`` (``0 <= k < num_inference_steps``): the image-shaped latents that *enter* the ``k``-th denoiser
  call (timestep ``scheduler_timesteps[k]``), read by a forward pre-hook on the denoiser (the conditional half
  where guidance doubles the batch); the generation stops there. Families whose denoiser takes another
  shape (FLUX's packed tokens) are refused with the reason.

Used by the dreams' ``start: example`` (feature accentuation from a top dataset example; Hamblin et al.
2024) and the heatmaps (:mod:`ddr_core.heatmaps`).

:func:`regenerate_positions` runs the whole generation again and records, at every denoiser call, the per-position
activations of chosen units at a hook point (``(n, steps, units, h, w)``, the conditional half under guidance):
where in the image a feature fires, step by step, which a capture does not store (it keeps one reduced value per
generation, step and unit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

PLAN_FILE = "capture_plan.json"
GENERATIONS_FILE = "generations.parquet"


@dataclass(frozen=True)
class CapturedGeneration:
    """One generation of a capture: what is needed to make it again."""

    generation_id: int
    prompt: str
    seed: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    image_path: str | None = None


@dataclass
class Regenerated:
    """What :func:`regenerate_latents` made: ``latents`` ``(n, C, h, w)`` float32 on the CPU, one row per
    requested generation (in order); ``step`` / ``timestep``: the denoising step they enter and its timestep
    (``None`` for the final latents)."""

    latents: torch.Tensor
    generations: list[CapturedGeneration]
    step: int | None
    timestep: int | None


def _generations_table(capture_root: Path) -> pl.DataFrame:
    path = capture_root / GENERATIONS_FILE
    if path.is_file():
        return pl.read_parquet(path)
    parts = sorted((capture_root / "generations").glob("batch_*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no generations table in {capture_root} ({GENERATIONS_FILE} or "
                                f"generations/batch_*.parquet): materialize the activations capture first")
    return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")


def read_generations(capture_root: str | Path, generation_ids: Sequence[int]) -> list[CapturedGeneration]:
    """The recorded prompt, seed and sampling parameters of ``generation_ids`` (in their order).

    Raises:
        FileNotFoundError: the capture has no plan or generations table (names the fix).
        KeyError: a generation id the capture does not hold.
    """
    root = Path(capture_root)
    plan_path = root / PLAN_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(f"no {PLAN_FILE} in {root}: materialize the activations capture first")
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    table = _generations_table(root)
    rows = {int(r["generation_id"]): r for r in table.iter_rows(named=True)}
    missing = [int(g) for g in generation_ids if int(g) not in rows]
    if missing:
        raise KeyError(f"generation id(s) {missing} are not in the capture {root} ({len(rows)} generations)")
    return [CapturedGeneration(
        generation_id=int(g), prompt=str(rows[int(g)]["prompt"]), seed=int(rows[int(g)]["seed"]),
        height=int(plan["height"]), width=int(plan["width"]), num_inference_steps=int(plan["num_inference_steps"]),
        guidance_scale=float(plan["guidance_scale"]), image_path=rows[int(g)].get("image_path"),
    ) for g in generation_ids]


class _Stop(Exception):
    """Raised by the pre-hook once the requested step's latents are read (the rest is not run)."""


@torch.no_grad()
def regenerate_latents(model: Any, generations: Sequence[CapturedGeneration], step: int | None = None,
                       batch_size: int = 16) -> Regenerated:
    """The latents of ``generations`` regenerated from their recorded seed and prompt (module docstring).

    Args:
        model: a :class:`~ddr_core.families.ModelFamily` or a loaded diffusers pipeline.
        generations: from :func:`read_generations`; all made with the same size, steps and guidance.
        step: the denoising step whose input latents are returned; ``None``: the final latents.
        batch_size: generations per call of ``generate``.

    Raises:
        ValueError: generations with different sampling parameters, or ``step`` out of range.
        NotImplementedError: ``step`` set for a family whose denoiser input is not image-shaped.
    """
    from ddr_core.families import as_model

    family = as_model(model)
    if not generations:
        raise ValueError("regenerate_latents needs at least one generation")
    params = {(g.height, g.width, g.num_inference_steps, g.guidance_scale) for g in generations}
    if len(params) != 1:
        raise ValueError(f"generations with different sampling parameters {sorted(params)}: regenerate each "
                         "capture's generations separately")
    height, width, steps, guidance = params.pop()
    timesteps = family.scheduler_timesteps(steps, height, width)
    if step is not None and not 0 <= step < len(timesteps):
        raise ValueError(f"step must lie in [0, {len(timesteps)}) (the capture's denoising steps), got {step}")
    shape = family.latent_shape(height, width)
    out: list[torch.Tensor] = []
    for first in range(0, len(generations), batch_size):
        chunk = list(generations[first:first + batch_size])
        latents = family.initial_latents([g.seed for g in chunk], height, width, dtype=family.dtype,
                                         device=family.device)
        kwargs = {"prompts": [g.prompt for g in chunk], "latents": latents, "height": height, "width": width,
                  "num_inference_steps": steps, "guidance_scale": guidance}
        if step is None:
            out.append(family.generate(**kwargs, output_type="latent").float().cpu())
            continue
        seen: dict[str, Any] = {"calls": 0}

        def pre_hook(_module: Any, args: tuple, hook_kwargs: dict, seen: dict[str, Any] = seen,
                     n: int = len(chunk)) -> None:
            if seen["calls"] == step:
                sample = hook_kwargs.get("sample", args[0] if args else None)
                if not isinstance(sample, torch.Tensor) or tuple(sample.shape[1:]) != tuple(shape):
                    raise NotImplementedError(
                        f"{type(family).__name__}: the denoiser's input is not image-shaped "
                        f"({None if sample is None else tuple(sample.shape)}), so the latents of an intermediate "
                        "step cannot be read here; use step=None (the final latents)")
                seen["latents"] = sample[-n:].detach().float().cpu().clone()  # conditional half under CFG
                raise _Stop
            seen["calls"] += 1

        handle = family.denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            family.generate(**kwargs, output_type="latent")
        except _Stop:
            pass
        finally:
            handle.remove()
        if "latents" not in seen:
            raise RuntimeError(f"the generation ended after {seen['calls']} denoiser calls, before step {step}")
        out.append(seen["latents"])
    return Regenerated(latents=torch.cat(out), generations=list(generations), step=step,
                       timestep=None if step is None else int(timesteps[step]))


UnitMaps = Callable[[torch.Tensor], torch.Tensor]
"""Float32 tokens ``(batch, positions, channels)`` -> per-position unit activations ``(batch, positions, units)``."""


@dataclass
class PositionRecording:
    """What :func:`regenerate_positions` made: ``maps`` ``(n, steps, units, h, w)`` float32 on the CPU (row ``i``:
    ``generations[i]``; step ``k``: the ``k``-th denoiser call, timestep ``timesteps[k]``), and the final
    ``latents`` ``(n, C, h', w')``."""

    maps: torch.Tensor
    timesteps: list[int]
    latents: torch.Tensor
    generations: list[CapturedGeneration]


def position_grid(activation: torch.Tensor) -> tuple[int, int]:
    """``(h, w)`` of a layer activation: its spatial size when ``(B, C, H, W)``; for tokens ``(B, N, C)`` a square
    grid (``N`` a perfect square). Raises ``ValueError`` for anything else (naming the shape)."""
    if activation.ndim == 4:
        return int(activation.shape[2]), int(activation.shape[3])
    if activation.ndim == 3:
        side = int(round(activation.shape[1] ** 0.5))
        if side * side == activation.shape[1]:
            return side, side
    raise ValueError(f"the layer's activation {tuple(activation.shape)} has no square grid of positions: heatmaps "
                     "need a (B, C, H, W) activation or (B, N, C) tokens with N a perfect square")


@torch.no_grad()
def regenerate_positions(model: Any, generations: Sequence[CapturedGeneration], hook_point: Any,
                         unit_maps: UnitMaps, batch_size: int = 16) -> PositionRecording:
    """Regenerate ``generations`` (as :func:`regenerate_latents` with ``step=None``) and record at every denoiser
    call ``unit_maps`` of the tokens at ``hook_point`` (a :class:`~ddr_core.hooks.HookPoint`, e.g.
    ``family.hook_point(layer)``; the conditional half where guidance doubles the batch), as per-position maps.

    Raises:
        ValueError: generations with different sampling parameters; a layer without a grid of positions; a
            denoiser called a number of times other than the capture's steps.
    """
    from ddr_core.families import as_model
    from ddr_core.hooks import HostCopies, activation_tokens

    family = as_model(model)
    if not generations:
        raise ValueError("regenerate_positions needs at least one generation")
    params = {(g.height, g.width, g.num_inference_steps, g.guidance_scale) for g in generations}
    if len(params) != 1:
        raise ValueError(f"generations with different sampling parameters {sorted(params)}: regenerate each "
                         "capture's generations separately")
    height, width, steps, guidance = params.pop()
    timesteps = [int(t) for t in family.scheduler_timesteps(steps, height, width)]
    maps: list[torch.Tensor] = []
    finals: list[torch.Tensor] = []
    for first in range(0, len(generations), batch_size):
        chunk = list(generations[first:first + batch_size])
        seen: list[torch.Tensor] = []
        copies = HostCopies()  # the maps stay on the device until the chunk's generation ends (no sync per step)

        def hook(args: tuple, kwargs: dict, output: Any, seen: list[torch.Tensor] = seen, n: int = len(chunk),
                 copies: HostCopies = copies) -> None:
            activation = hook_point.read(args, kwargs, output).detach()
            grid = position_grid(activation)
            tokens = activation_tokens(activation)[-n:].float()  # conditional half under CFG
            values = unit_maps(tokens).float()  # (n, positions, units)
            copies.append(seen, values.transpose(1, 2).reshape(n, values.shape[2], *grid))

        latents = family.initial_latents([g.seed for g in chunk], height, width, dtype=family.dtype,
                                         device=family.device)
        handle = hook_point.register(hook)
        try:
            finals.append(family.generate(prompts=[g.prompt for g in chunk], latents=latents, height=height,
                                          width=width, num_inference_steps=steps, guidance_scale=guidance,
                                          output_type="latent").float().cpu())
        finally:
            handle.remove()
        copies.flush()
        if len(seen) != len(timesteps):
            raise ValueError(f"the layer {getattr(hook_point, 'name', hook_point)!r} was called {len(seen)} times in "
                             f"a generation of {len(timesteps)} steps: heatmaps need one call per denoising step")
        maps.append(torch.stack(seen, dim=1))
    return PositionRecording(maps=torch.cat(maps), timesteps=timesteps, latents=torch.cat(finals),
                             generations=list(generations))


def top_example_generations(stats_dir: str | Path, channel: int, n: int) -> list[int]:
    """The ``n`` generations with the highest activation of ``channel`` at any observed timestep in the
    statistics' ``dataset_examples`` table (each generation once, highest first; ties: lower id)."""
    path = Path(stats_dir) / "dataset_examples.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset_examples.parquet in {stats_dir}: materialize timestep_stats first "
                                "(dreams with start: example begin from a channel's top dataset examples)")
    table = (pl.scan_parquet(path).filter(pl.col("channel") == int(channel))
             .group_by("generation_id").agg(pl.col("activation").max())
             .sort(["activation", "generation_id"], descending=[True, False]).head(int(n)).collect())
    return [int(g) for g in table["generation_id"].to_list()]


def example_starts(model: Any, capture_root: str | Path, stats_dir: str | Path, channel: int,
                   n: int) -> tuple[torch.Tensor, list[int]]:
    """``(latents (k, C, h, w), generation ids)``: the final latents of ``channel``'s ``k <= n`` top dataset
    examples, regenerated from their recorded seeds (the start of ``start: example`` dreams). ``k`` is 0
    when the channel has no dataset example."""
    ids = top_example_generations(stats_dir, channel, n)
    if not ids:
        return torch.empty(0), []
    regenerated = regenerate_latents(model, read_generations(capture_root, ids))
    return regenerated.latents, ids
