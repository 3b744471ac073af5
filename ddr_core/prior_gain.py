"""Does a prior drive its channel? Each prior measured against the **unsteered** generation of the same seed.

A prior (:mod:`ddr_core.priors`) is ``n_results`` empty-prompt generations, one per seed, while a channel is
steered. Whether the steering made the channel fire more is asked here, once, where the priors are made
(:func:`ddr_core.priors.run_priors` records it in each channel's ``prior.json``, resumably), and reported by the
visualisation benchmark (:func:`prior_gain_rows`) and ``benchmarks/prior_steering.py``:

- **unsteered**: the empty-prompt generation of each seed with nothing steered (same steps, size and initial
  noise), made once per priors folder and settings and kept in ``<priors folder>/unsteered.safetensors``
  (``n_seeds`` generations, shared by every channel);
- **measured**: the prior's final latent and the unsteered one of the same seed, both by
  :func:`ddr_core.dreams.measure_activations` (the dream quality check's measure) at the channel's highest
  activity peak (:func:`ddr_core.steering.top_peaks`), each schedule-noise draw shared by the pair
  (``element_seed(0, channel, peak, seed, draw)``), ``noise_draws`` draws (``PriorsConfig.gain_noise_draws``);
- **gain** = steered minus unsteered activation (per image); **raised** when the gain exceeds the noise of
  the unsteered activation: :func:`ddr_core.dream_verdict.with_raised` (the dreams' one definition), with the
  unsteered activation as the start, i.e. ``gain > noise_sd_multiple x sd`` of the channel's unsteered
  activations pooled over its seeds and draws.

``prior.json``'s ``activation`` (absent on priors made before this measurement; :func:`record_prior_gain` adds it):
``{"format", "timestep", "noise_draws", "steered", "unsteered", "steered_draw_sd", "unsteered_draw_sd"}`` (lists
in seed order), or ``{"format", "timestep": null, "reason"}`` when not measured (no activity peak).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

GAIN_FORMAT = "ddr.prior_gain/1"
UNSTEERED_FILE = "unsteered.safetensors"
ACTIVATION_KEY = "activation"
GAIN_COLUMNS: dict[str, Any] = {"gain_timestep": pl.Int64, "gain_noise_draws": pl.Int32,
                                "steered_activation": pl.Float64, "unsteered_activation": pl.Float64,
                                "unsteered_draw_sd": pl.Float64}
"""Per prior image, from ``prior.json``'s ``activation`` (null where not measured)."""


def unsteered_latents(model: Any, layer_name: str, out_dir: str | Path, settings_hash: str, seeds: Sequence[int], *,
                      num_inference_steps: int, height: int, width: int, batch_size: int) -> Any:
    """``(n_seeds, latent_channels, h, w)`` final latents of the unsteered empty-prompt generations of ``seeds``
    (:func:`ddr_core.priors.generate_priors` with a zero strength: the same path as a prior, nothing added).
    Kept in ``out_dir/unsteered.safetensors`` for ``settings_hash`` (the priors' settings hash); another hash or
    other seeds make it again."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ddr_core.atomic import atomic_path
    from ddr_core.priors import generate_priors
    from ddr_core.tensor_files import canonical_metadata, read_metadata

    path = Path(out_dir) / UNSTEERED_FILE
    seeds = [int(s) for s in seeds]
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            same = read_metadata(handle).get("config_hash") == settings_hash
            if same and handle.get_tensor("seeds").tolist() == seeds:
                return handle.get_tensor("latents")
    zero = torch.zeros(1, model.layer_width(layer_name))
    latents, _ = generate_priors(model, layer_name, zero, torch.zeros(1, model.num_train_timesteps), seeds,
                                 num_inference_steps=num_inference_steps, batch_size=batch_size, height=height,
                                 width=width)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"latents": latents[0].contiguous(), "seeds": torch.tensor(seeds, dtype=torch.int64)}, str(tmp),
                  metadata=canonical_metadata({"format": GAIN_FORMAT, "config_hash": settings_hash,
                                               "what": "unsteered empty-prompt generations"}))
    return latents[0]


def measure_prior_activation(model: Any, basis: Any, layer_name: str, channel: int, steered: Any, unsteered: Any,
                             timestep: int | None, seeds: Sequence[int], noise_draws: int,
                             random_seed: int = 0) -> dict[str, Any]:
    """The ``activation`` record of one channel's prior (see the module docstring): ``steered`` and ``unsteered``
    ``(n_seeds, ...)`` latents measured at ``timestep`` over ``noise_draws`` schedule-noise draws shared by each
    seed's pair. ``timestep`` ``None``: not measured (the channel has no activity peak)."""
    import torch

    from ddr_core.dreams import DreamObjective, measure_activations
    from ddr_core.dreams.optimise import element_generators, element_seed

    if timestep is None:
        return {"format": GAIN_FORMAT, "timestep": None, "reason": "the channel has no activity peak"}
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be >= 1 to measure a prior, got {noise_draws}")
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if steered.shape[0] != n or unsteered.shape[0] != n:
        raise ValueError(f"steered {tuple(steered.shape)} and unsteered {tuple(unsteered.shape)} latents need one "
                         f"row per seed ({n})")
    latents = torch.cat([steered.float(), unsteered.float()])
    timesteps = torch.full((2 * n,), int(timestep))
    # every draw of every element in one forward: element (draw, i) sees the noise of (seed i, draw), shared by the
    # steered and the unsteered latent of that seed
    generators = element_generators([element_seed(random_seed, channel, timestep, seed, draw=1 + draw)
                                     for draw in range(noise_draws) for seed in seeds * 2])
    objective = DreamObjective(torch.full((2 * n * noise_draws,), int(channel)), basis)
    with torch.inference_mode():
        values = measure_activations(model, layer_name, objective, latents.repeat(noise_draws, 1, 1, 1),
                                     timesteps.repeat(noise_draws), [generators]).reshape(noise_draws, 2 * n)
    mean = values.mean(dim=0)
    sd = values.std(dim=0, unbiased=True) if noise_draws > 1 else torch.zeros_like(mean)

    def finite(items: Any) -> list[float | None]:
        return [float(v) if math.isfinite(v) else None for v in items.tolist()]

    return {"format": GAIN_FORMAT, "timestep": int(timestep), "noise_draws": int(noise_draws),
            "steered": finite(mean[:n]), "unsteered": finite(mean[n:]),
            "steered_draw_sd": finite(sd[:n]), "unsteered_draw_sd": finite(sd[n:])}


def record_prior_gain(model: Any, basis: Any, layer_name: str, stats_dir: str | Path, out_dir: str | Path,
                      channels: Sequence[int], noise_draws: int, batch_size: int = 16,
                      replace: bool = False) -> list[int]:
    """Add ``activation`` to the finished (``done``) priors of ``channels`` in ``out_dir`` that lack it (all of
    them with ``replace``), rewriting each ``prior.json`` atomically; returns the channels measured. For priors
    made before the measurement existed (``benchmarks/prior_steering.py``) and for a resumed run. The caller
    holds the channels' claim (:func:`ddr_core.locks.claim_channels`) or owns the folder alone."""
    from safetensors.torch import load_file

    from ddr_core.atomic import atomic_write_json
    from ddr_core.basis import as_basis
    from ddr_core.channel_store import PRIOR_FILE, channel_dir, read_prior
    from ddr_core.families import as_model
    from ddr_core.steering import top_peaks

    out_dir = Path(out_dir)
    todo = []
    for channel in channels:
        record = read_prior(out_dir, channel)
        if record and record.get("status") == "done" and (replace or ACTIVATION_KEY not in record):
            todo.append((int(channel), record))
    if not todo or noise_draws < 1:
        return []
    model = as_model(model)
    basis = as_basis(basis, model.layer_width(layer_name))
    first = todo[0][1]
    unsteered = unsteered_latents(model, layer_name, out_dir, first["config_hash"], first["seeds"],
                                  num_inference_steps=int(first["num_inference_steps"]),
                                  height=int(first["height"]), width=int(first["width"]), batch_size=batch_size)
    peaks = top_peaks(stats_dir, [c for c, _ in todo])
    for channel, record in todo:
        if record["config_hash"] != first["config_hash"]:
            raise ValueError(f"{channel_dir(out_dir, channel)} was made with other settings than channel "
                             f"{todo[0][0]}; one priors folder holds one setting")
        steered = load_file(str(channel_dir(out_dir, channel) / "latents.safetensors"))["latents"]
        activation = measure_prior_activation(model, basis, layer_name, channel, steered, unsteered,
                                              peaks.get(channel), record["seeds"], noise_draws)
        atomic_write_json(channel_dir(out_dir, channel) / PRIOR_FILE, {**record, ACTIVATION_KEY: activation})
    return [c for c, _ in todo]


def activation_rows(channel: int, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per seed of a finished prior record, the :data:`GAIN_COLUMNS` (nulls where not measured)."""
    seeds = [int(s) for s in record.get("seeds") or []]
    found = record.get(ACTIVATION_KEY) or {}
    measured = found.get("timestep") is not None

    def pick(key: str, index: int) -> float | None:
        values = found.get(key) or []
        return values[index] if measured and index < len(values) else None

    return [{"gain_timestep": found.get("timestep") if measured else None,
             "gain_noise_draws": found.get("noise_draws") if measured else None,
             "steered_activation": pick("steered", i), "unsteered_activation": pick("unsteered", i),
             "unsteered_draw_sd": pick("unsteered_draw_sd", i)} for i in range(len(seeds))]


def with_prior_gain(images: pl.DataFrame, multiple: float) -> pl.DataFrame:
    """Prior images (``channel, seed`` + :data:`GAIN_COLUMNS`) with ``gain_over_unsteered``,
    ``unsteered_noise_sd`` and ``raised_over_unsteered``: :func:`ddr_core.dream_verdict.with_raised` with the
    unsteered activation as the start (its sd pooled over the channel's seeds and draws)."""
    from ddr_core.dream_verdict import with_raised

    extra = {"gain_over_unsteered": pl.Float64, "unsteered_noise_sd": pl.Float64, "raised_over_unsteered": pl.Boolean}
    if "steered_activation" not in images.columns:
        return images.with_columns(pl.lit(None, dtype).alias(name) for name, dtype in extra.items())
    measured = images.filter(pl.col("steered_activation").is_not_null() & pl.col("unsteered_activation").is_not_null())
    if measured.height == 0:
        return images.with_columns(pl.lit(None, dtype).alias(name) for name, dtype in extra.items())
    quality = measured.select(
        pl.col("channel").cast(pl.Int64), pl.col("gain_timestep").cast(pl.Int64).alias("timestep"),
        pl.col("seed").cast(pl.Int64), pl.col("steered_activation").alias("dream_activation"),
        pl.col("unsteered_activation").alias("prior_activation"), pl.col("unsteered_draw_sd").alias("prior_draw_sd"),
        pl.col("gain_noise_draws").cast(pl.Int32).alias("noise_draws"), pl.lit(False).alias("failed"))
    verdict = with_raised(quality, multiple).select(
        pl.col("channel").cast(images.schema["channel"]), pl.col("seed").cast(images.schema["seed"]),
        pl.col("gain").alias("gain_over_unsteered"), pl.col("noise_sd").alias("unsteered_noise_sd"),
        pl.col("raised").alias("raised_over_unsteered"))
    return images.join(verdict, on=["channel", "seed"], how="left", maintain_order="left")


def prior_gain_rows(images: pl.DataFrame, config: Any) -> list[dict[str, Any]]:
    """The benchmark rows of a prior method (``config``: :class:`ddr_core.visual_benchmark.VisualBenchmarkConfig`):

    - ``gain_over_unsteered``: mean per-image gain, bootstrap interval over channels, p: sign flips of the
      channels' mean gains (null 0);
    - ``raised_over_unsteered_share``: share of prior images raised above the unsteered activation's noise;
    - ``channels_gaining``: count (not a share) of channels whose mean gain is above 0, of ``n`` measured.
    """
    from ddr_core.benchmark_stats import cluster_bootstrap, sign_flip_test
    from ddr_core.visual_benchmark import _row

    boot = {"level": config.level, "resamples": config.bootstrap_resamples, "seed": config.seed}
    framed = images if "gain_over_unsteered" in images.columns else with_prior_gain(images, config.noise_sd_multiple)
    measured = framed.filter(pl.col("gain_over_unsteered").is_not_null() & pl.col("gain_over_unsteered").is_finite())
    if measured.height == 0:
        why = "not measured: no prior records its activation (priors made before the measurement, or " \
              "gain_noise_draws = 0; benchmarks/prior_steering.py adds it)"
        return [_row(metric, None, note=why) for metric in
                ("gain_over_unsteered", "raised_over_unsteered_share", "channels_gaining")]
    gains, channels = measured["gain_over_unsteered"].to_list(), measured["channel"].to_list()
    per_channel = (measured.group_by("channel").agg(pl.col("gain_over_unsteered").mean()).sort("channel")
                   ["gain_over_unsteered"].to_list())
    draws = int(measured["gain_noise_draws"].max() or 1)
    raised = measured["raised_over_unsteered"].cast(pl.Float64).to_list()
    noise = (f"gain > {config.noise_sd_multiple:g} x sd of the unsteered activation over the channel's seeds and "
             f"{draws} schedule-noise draw(s) (ddr_core.dream_verdict.with_raised)")
    return [
        _row("gain_over_unsteered", float(np.mean(gains)), interval=cluster_bootstrap(gains, channels, **boot),
             p_value=sign_flip_test(per_channel, permutations=config.permutations, seed=config.seed),
             n=len(gains), chance=0.0, null="0; p: signs of the channels' mean gains flipped",
             note=f"prior activation minus the unsteered empty-prompt generation of the same seed, at the channel's "
                  f"top activity peak, {draws} shared schedule-noise draw(s) (ddr_core.prior_gain)"),
        _row("raised_over_unsteered_share", float(np.mean(raised)), n=len(raised), null=noise,
             interval=cluster_bootstrap(raised, channels, **boot),
             note="priors whose steering raised their channel above the unsteered activation's noise"),
        _row("channels_gaining", float(sum(g > 0 for g in per_channel)), n=len(per_channel),
             note="count (not a share) of channels whose mean gain over the unsteered generation is above 0"),
    ]


def record_prior_gain_for_variant(project: Any, layout: Any, variant: str, stage: str, channels: Sequence[int],
                                  noise_draws: int, device: str = "cpu", replace: bool = False) -> list[int]:
    """:func:`record_prior_gain` on ``layout.stage_dir(stage, variant)`` with the variant's model and basis (e.g.
    the demo's priors, made before the measurement existed); returns the channels measured."""
    from ddr_core.variant_inputs import load_variant_model

    out_dir = layout.stage_dir(stage, variant)
    model, basis = load_variant_model(project, layout, variant, out_dir, "priors folder", device, "float32")
    return record_prior_gain(model, basis, project.layer_of(variant), layout.timestep_stats_dir(variant), out_dir,
                             channels, noise_draws, replace=replace)


def prior_verdicts(record: dict[str, Any] | None, multiple: float | None = None) -> list[str | None]:
    """Per seed of a finished prior record, its verdict against the unsteered generation as plain text (``None``
    where not measured), e.g. ``"vs unsteered: raised (gain 0.52 vs noise 0.10)"`` or ``"vs unsteered: not raised
    (gain 0.001 vs noise 0.03)"``: :func:`with_prior_gain` on the channel's seeds (the inspector and the HTML
    export show it under each prior, as text)."""
    from ddr_core.dream_verdict import NOISE_SD_MULTIPLE, verdict_text

    if not record or record.get("status") != "done":
        return []
    seeds = [int(s) for s in record.get("seeds") or []]
    channel = int(record.get("channel") or 0)
    rows = [{"channel": channel, "seed": seed, **gain}
            for seed, gain in zip(seeds, activation_rows(channel, record), strict=True)]
    frame = pl.DataFrame(rows, schema={"channel": pl.Int32, "seed": pl.Int64, **GAIN_COLUMNS}, orient="row")
    judged = with_prior_gain(frame, NOISE_SD_MULTIPLE if multiple is None else multiple)
    out: list[str | None] = []
    for row in judged.iter_rows(named=True):
        if row["gain_over_unsteered"] is None:
            out.append(None)
            continue
        text = verdict_text({"gain": row["gain_over_unsteered"], "noise_sd": row["unsteered_noise_sd"],
                             "raised": row["raised_over_unsteered"], "failed": False})
        out.append(f"vs unsteered: {text}")
    return out
