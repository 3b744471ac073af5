"""A channel's files: its start latents (the priors' ``latents.safetensors``) and its dreams folder
(``channel_<c>/``, written atomically, ``dream.json`` last; layout in :mod:`ddr_core.dreams`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ddr_core.atomic import TEMP_MARKER, atomic_dir, atomic_write_json
from ddr_core.channel_store import DREAM_FILE, PRIOR_LATENTS_FILE, channel_dir, timestep_dir_name
from ddr_core.channel_store import finished_channels as store_finished_channels
from ddr_core.dreams.config import STAT_NAMES, DreamConfig
from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def load_file(filename: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """:func:`safetensors.torch.load_file`, imported at the first call (it imports torch)."""
    from safetensors.torch import load_file as load

    return load(filename, device=device)


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """:func:`safetensors.torch.save_file`, imported at the first call (it imports torch)."""
    from safetensors.torch import save_file as save

    save(tensors, filename, metadata=metadata)


def prior_latents_path(priors_dir: str | Path, channel: int) -> Path:
    return channel_dir(priors_dir, channel) / PRIOR_LATENTS_FILE


def load_prior_latents(priors_dir: str | Path, channel: int, n_results: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``n_results`` prior latents ``(n, 4, h, w)`` float32 of a channel and their seeds.

    Raises:
        FileNotFoundError: naming the missing file and the fix.
    """
    path = prior_latents_path(priors_dir, channel)
    if not path.is_file():
        raise FileNotFoundError(
            f"no prior latents for channel {channel} ({path} is missing): compute the priors stage for these "
            f"channels first, or set use_prior: false to start dreams from seeded noise"
        )
    tensors = load_file(str(path))
    if "latents" not in tensors:
        raise ValueError(f"{path} has no 'latents' tensor; recompute the priors of channel {channel}")
    latents = tensors["latents"].float()[:n_results]
    if "seeds" in tensors:
        seeds = [int(s) for s in tensors["seeds"].flatten()[: latents.shape[0]].tolist()]
    else:
        seeds = list(range(latents.shape[0]))
    return latents, seeds


@dataclass
class ChannelPlan:
    """Elements of one channel: every timestep x every start latent."""

    channel: int
    timesteps: list[int]
    seeds: list[int]
    init_latents: torch.Tensor  # (n_seeds, 4, h, w)
    skipped_timesteps: list[dict[str, Any]] = field(default_factory=list)  # not dreamed: no signal there

    @property
    def n_elements(self) -> int:
        return len(self.timesteps) * len(self.seeds)


def finished_channels(out_dir: str | Path) -> set[int]:
    """Channels whose folder holds ``dream.json``."""
    return store_finished_channels(out_dir, DREAM_FILE)


def _relative(path: Path, root: Path) -> str:
    from ddr_core.paths import UnsafePathError, relative_to_data_root

    try:
        return relative_to_data_root(root, path)
    except UnsafePathError:
        return path.as_posix()


def _json_float(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _write_channel(
    model: Any,
    out_dir: Path,
    plan: ChannelPlan,
    results: dict[tuple[int, int], dict[str, Any]],
    config: DreamConfig,
    data_root: Path,
    info: dict[str, Any],
) -> list[dict[str, Any]]:
    """Write one channel's folder atomically (``dream.json`` last); returns its failures."""
    destination = channel_dir(out_dir, plan.channel)
    failures: list[dict[str, Any]] = []
    per_timestep: dict[str, Any] = {}
    with atomic_dir(destination) as tmp:
        for timestep in plan.timesteps:
            folder = tmp / timestep_dir_name(timestep)
            (folder / "steps").mkdir(parents=True)
            element_results = [results[(timestep, seed)] for seed in plan.seeds]
            final = torch.stack([r["latents"] for r in element_results])
            # where the optimisation started, as a picture (the start latents, or their rendering by a manifold
            # parameterisation: ddr_core.dreams.parameterisations)
            initial = (torch.stack([r["initial_latents"] for r in element_results])
                       if all(r.get("initial_latents") is not None for r in element_results) else plan.init_latents)
            save_file(
                {
                    "latents": final.contiguous(),
                    "initial_latents": initial.float().contiguous(),
                    "seeds": torch.tensor(plan.seeds, dtype=torch.int64),
                },
                str(folder / "latents.safetensors"),
            )
            for seed, image in zip(plan.seeds, model.decode(final, config.batch_size), strict=True):
                image.save(folder / f"seed_{seed}.png", format="PNG")
            snapshot_latents, snapshot_names = [], []
            for seed, result in zip(plan.seeds, element_results, strict=True):
                for step, latent in sorted(result["snapshots"].items()):
                    snapshot_latents.append(latent)
                    snapshot_names.append(f"seed_{seed}_step_{step:04d}.png")
            if snapshot_latents:
                images = model.decode(torch.stack(snapshot_latents), config.batch_size)
                for name, image in zip(snapshot_names, images, strict=True):
                    image.save(folder / "steps" / name, format="PNG")
            rows: dict[str, list] = {"seed": [], "step": [], **{name: [] for name in STAT_NAMES}}
            for seed, result in zip(plan.seeds, element_results, strict=True):
                for step, stats in result["stats"]:
                    rows["seed"].append(seed)
                    rows["step"].append(step)
                    for name in STAT_NAMES:
                        rows[name].append(stats[name])
            schema = {"seed": pl.Int64, "step": pl.Int32, **{name: pl.Float64 for name in STAT_NAMES}}
            pl.DataFrame(rows, schema=schema).write_parquet(folder / "stats.parquet")
            final_dir = destination / timestep_dir_name(timestep)
            per_timestep[str(timestep)] = {
                "seeds": plan.seeds,
                "final_activation": [_json_float(r["final_activation"]) for r in element_results],
                "images": [_relative(final_dir / f"seed_{seed}.png", data_root) for seed in plan.seeds],
                "latents": _relative(final_dir / "latents.safetensors", data_root),
            }
            for seed, result in zip(plan.seeds, element_results, strict=True):
                if result["failed"] is not None:
                    failures.append({"channel": plan.channel, "timestep": timestep, "seed": seed,
                                     "step": result["failed_step"], "reason": result["failed"]})
        dream = {
            "channel": plan.channel,
            **info,
            "timesteps": plan.timesteps,
            "seeds": plan.seeds,
            "results": per_timestep,
            "failures": failures,
            "skipped_timesteps": plan.skipped_timesteps,
            "config": config.model_dump(mode="json"),
            "config_hash": config.config_hash(),
        }
        atomic_write_json(tmp / DREAM_FILE, dream)
    return failures


def _empty_channel(out_dir: Path, channel: int, config: DreamConfig, info: dict[str, Any], reason: str,
                   skipped_timesteps: list[dict[str, Any]] | None = None) -> None:
    with atomic_dir(channel_dir(out_dir, channel)) as tmp:
        atomic_write_json(tmp / DREAM_FILE, {
            "channel": channel, **info, "timesteps": [], "seeds": [], "results": {}, "failures": [],
            "skipped": reason, "skipped_timesteps": list(skipped_timesteps or []), "config": config.model_dump(mode="json"), "config_hash": config.config_hash(),
        })


def _remove_channel_leftovers(out_dir: Path, channel: int) -> None:
    """Delete the temporaries :func:`ddr_core.atomic.atomic_dir` left for ``channel`` when its run died."""
    for leftover in out_dir.glob(f".{channel_dir(out_dir, channel).name}{TEMP_MARKER}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
