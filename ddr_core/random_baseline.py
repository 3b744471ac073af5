"""The random-latent baseline of dreams: how high does a channel fire on latents nobody optimised?

A dream is worth showing when the optimiser raised its channel's activation above what chance latents
reach, not only above its own start. For each (channel, timestep) a method dreamed at, ``n_random`` latents
of seeded standard-normal noise (the family's :meth:`initial_latents`, seeds derived from ``(seed,
channel, timestep, r)``) are measured the way the dream stage's quality check measures dreams
(:func:`ddr_core.dreams.measure_activations`: no augmentation, averaged over ``noise_draws`` scheduler-noise
draws when the method sees through the schedule's noise). The benchmark compares each dream with the best
of them (``best_random``). Cost: ``n_random x noise_draws`` forward passes to the layer per (channel,
timestep), batched: seconds on the toy world's model on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import torch

SCHEMA: dict[str, Any] = {"channel": pl.Int32, "timestep": pl.Int64, "best_random": pl.Float64,
                          "mean_random": pl.Float64, "sd_random": pl.Float64, "n_random": pl.Int32}


def derived_seed(*parts: int) -> int:
    """A 31-bit seed determined by ``parts`` alone (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def random_latent_activations(model: Any, basis: Any, layer_name: str, pairs: Sequence[tuple[int, int]], *,
                              height: int, width: int, n_random: int = 8, noise_draws: int = 4,
                              schedule_noise: bool = True, seed: int = 0, batch_size: int = 64) -> pl.DataFrame:
    """``channel, timestep, best_random, mean_random, sd_random, n_random`` for each ``(channel, timestep)``
    of ``pairs`` (images of ``height x width`` pixels)."""
    from ddr_core.dreams import DreamObjective, element_generators, measure_activations

    layer = model.hook_point(layer_name)
    elements = [(int(c), int(t), r) for c, t in sorted(set(pairs)) for r in range(n_random)]
    values: list[float] = []
    for first in range(0, len(elements), batch_size):
        chunk = elements[first:first + batch_size]
        latents = model.initial_latents([derived_seed(seed, c, t, r) for c, t, r in chunk], height, width)
        draws = None
        if schedule_noise:
            draws = [element_generators([derived_seed(seed, c, t, r, 1 + d) for c, t, r in chunk])
                     for d in range(noise_draws)]
        objective = DreamObjective(torch.tensor([c for c, _, _ in chunk], dtype=torch.long), basis)
        measured = measure_activations(model, layer, objective, latents, [t for _, t, _ in chunk], draws)
        values.extend(float(v) for v in measured.tolist())
    rows = []
    for index in range(0, len(elements), max(n_random, 1)):
        channel, timestep, _ = elements[index]
        sample = np.asarray(values[index:index + n_random], dtype=float)
        rows.append({"channel": channel, "timestep": timestep, "best_random": float(np.nanmax(sample)),
                     "mean_random": float(np.nanmean(sample)),
                     "sd_random": float(np.nanstd(sample, ddof=1)) if n_random > 1 else None, "n_random": n_random})
    return pl.DataFrame(rows, schema=SCHEMA, orient="row") if rows else pl.DataFrame(schema=SCHEMA)
