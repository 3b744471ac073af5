"""The dream run over channels (:func:`run_dreams`): checks its inputs, claims its channels, batches the
``(channel, timestep, seed)`` elements of many channels and writes each channel when it is complete; resumable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ddr_core.basis import Basis, as_basis
from ddr_core.channel_store import DREAM_FILE, channel_dir, prior_record_path
from ddr_core.dreams.channel_files import (
    ChannelPlan,
    _empty_channel,
    _remove_channel_leftovers,
    _write_channel,
    finished_channels,
    load_prior_latents,
)
from ddr_core.dreams.config import STAT_NAMES, DreamConfig, DreamObjective, LogFn
from ddr_core.dreams.optimise import element_generators, element_seed, optimise_dreams
from ddr_core.dreams.parameterisations import check_parameterisation, reference_magnitude
from ddr_core.dreams.timesteps import _load_timestep_table, resolve_dream_timesteps, split_by_signal
from ddr_core.lazy_imports import lazy_module
from ddr_core.locks import claim_channels, format_channels

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")


@dataclass
class DreamsResult:
    """What :func:`run_dreams` did."""

    out_dir: Path
    channels_done: list[int] = field(default_factory=list)
    channels_skipped: list[int] = field(default_factory=list)
    channels_without_timesteps: list[int] = field(default_factory=list)
    skipped_timesteps: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    """channel -> the timesteps not dreamed for lack of signal (``{"timestep", "signal", "reason"}``;
    :func:`~ddr_core.dreams.timesteps.split_by_signal`), also in each channel's ``dream.json``."""
    elements: int = 0
    element_steps: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    quality_path: Path | None = None
    quality: pl.DataFrame | None = None  # rows of this run's channels (set by dreams_for_variant)

    @property
    def element_steps_per_second(self) -> float:
        return self.element_steps / self.seconds if self.seconds > 0 else float("nan")


def check_dream_inputs(
    model: Any,
    stats_dir: str | Path | None,
    priors_dir: str | Path | None,
    channels: Sequence[int],
    config: DreamConfig,
) -> None:
    """Check what a dream run reads, before anything is optimised or written.

    Args:
        model: the loaded :class:`~ddr_core.families.ModelFamily` (its train timesteps bound integer timesteps).
        stats_dir: the timestep statistics folder (its tables are needed by timestep keywords).
        priors_dir: the priors folder when dreams start from priors, else ``None``.
        channels: the channels still to dream (each needs a finished prior when ``priors_dir`` is set).

    Raises:
        ValueError: an integer timestep outside ``[0, num_train_timesteps)`` of the scheduler.
        FileNotFoundError: a keyword's statistics table is missing, or channels have no finished prior
            (``prior.json``); the message names the fix.
    """
    total = model.num_train_timesteps
    too_late = [t for t in config.timesteps if isinstance(t, int) and not 0 <= t < total]
    if too_late:
        raise ValueError(f"timesteps {too_late} lie outside the scheduler's train timesteps 0..{total - 1}; "
                         f"use timesteps below {total}")
    for keyword in dict.fromkeys(t for t in config.timesteps if isinstance(t, str)):
        if stats_dir is None:
            raise FileNotFoundError(f"timestep keyword {keyword!r} needs the timestep statistics folder; "
                                    "materialize timestep_stats for the variant first, or use integer timesteps")
        _load_timestep_table(Path(stats_dir), keyword)
    if priors_dir is not None:
        missing = [int(c) for c in channels
                   if not prior_record_path(priors_dir, int(c)).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no finished priors for channel(s) {format_channels(missing)} in {priors_dir}: materialize the "
                f"priors of these channels first, or set use_prior: false to start dreams from seeded noise"
            )


def run_dreams(
    pipe: Any,
    basis: Basis | nn.Module | None,
    layer_name: str,
    stats_dir: str | Path | None,
    priors_dir: str | Path | None,
    channels: Sequence[int],
    out_dir: str | Path,
    config: DreamConfig,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
    log: LogFn | None = None,
    stop_after_channels: int | None = None,
    lock_wait: bool | float = False,
    lock_owner: str = "",
    example_start: Callable[[int, int], tuple[torch.Tensor, list[int]]] | None = None,
) -> DreamsResult:
    """Dream every channel of ``channels`` at its timesteps from each start latent; resumable.

    Elements ``(channel, timestep, seed)`` are ordered by channel, timestep, seed and optimised
    ``batch_size`` at a time (mixing channels and timesteps in one batch). A channel is written
    when all its elements are done. Channels already holding ``dream.json`` are skipped.

    Args:
        pipe: a :class:`~ddr_core.families.ModelFamily` or a loaded diffusers pipeline (its denoiser's dtype is
            used for the forward pass).
        basis: the variant's :class:`~ddr_core.basis.Basis` (an SAE or ``None`` for raw channels are
            taken as their basis); ``channels`` are its units.
        layer_name: dotted name of the target layer.
        stats_dir: timestep statistics folder (needed for timestep keywords).
        priors_dir: the priors stage folder; ``None`` or ``config.use_prior`` false: seeded noise.
        out_dir: the dreams stage folder.
        data_root: paths in ``dream.json`` are relative to it (default: ``out_dir``).
        batch_size: elements per optimisation batch (default ``config.batch_size``).
        stop_after_channels: stop after writing this many channels (tests simulate a kill with it).
        lock_wait, lock_owner: the run claims ``channels`` of ``out_dir`` while it works
            (:func:`ddr_core.locks.claim_channels`): another live run holding any of them makes it
            fail at once with :class:`~ddr_core.locks.ChannelsLockedError`, or wait ``lock_wait``
            seconds; runs on other channels of the same folder run side by side.
        example_start: ``(channel, n) -> (latents, generation ids)`` of ``start: example``
            (:func:`ddr_core.regenerate.example_starts`); its generation ids are the elements' seeds.

    Raises:
        ValueError: a channel outside the layer / SAE, or an integer timestep outside the scheduler's.
        FileNotFoundError: timestep keywords without their statistics table, or (``use_prior``)
            unfinished channels without a finished prior; nothing is written then.
        ChannelsLockedError: another live run is writing some of ``channels``.
    """
    from ddr_core.families import as_model
    from ddr_core.paths import check_output_folder
    from ddr_core.progress import Progress

    start = time.monotonic()
    out = check_output_folder(Path(out_dir), data_root, "dreams folder")  # not through a link
    root = Path(data_root) if data_root is not None else out
    batch_size = batch_size or config.batch_size
    model = as_model(pipe)
    layer = model.hook_point(layer_name)
    basis = as_basis(basis, model.layer_width(layer_name))
    channels = sorted({int(c) for c in channels})
    basis.check_units(channels)
    start_from = config.start_from
    use_prior = start_from == "prior" and priors_dir is not None
    if start_from == "prior" and priors_dir is None and log:
        log("dreams: no priors folder given; starting from seeded noise")
    if start_from == "example" and example_start is None:
        raise ValueError("start: example needs the capture's dataset examples: run it through dreams_for_variant "
                         "(or pass example_start), or use start: prior / noise")
    info = {"basis": basis.kind, "layer": layer_name, "use_prior": use_prior,
            **({"start": start_from} if start_from == "example" else {})}
    # Everything that can be checked is checked before anything is written.
    check_parameterisation(model, config.parameterisation)
    check_dream_inputs(model, stats_dir, priors_dir if use_prior else None,
                       [c for c in channels if c not in finished_channels(out)], config)

    with claim_channels(out, channels, wait=lock_wait,
                        owner=lock_owner or f"{out.parent.name} {out.name} channels {format_channels(channels)}"):
        done = finished_channels(out)
        result = DreamsResult(out_dir=out, channels_skipped=[c for c in channels if c in done])
        todo = [c for c in channels if c not in done]
        for channel in todo:  # folders a killed run was assembling (ours alone while claimed)
            _remove_channel_leftovers(out, channel)
        if result.channels_skipped and log:
            log(f"dreams: resuming, {len(result.channels_skipped)} of {len(channels)} channels already done")
            current = config.config_hash()
            other = [c for c in result.channels_skipped
                     if json.loads((channel_dir(out, c) / DREAM_FILE).read_text(encoding="utf-8")).get("config_hash")
                     != current]
            if other:
                log(f"dreams: warning: {len(other)} finished channel(s) (e.g. {other[0]}) were dreamed with another "
                    f"config; they are kept as they are -- delete their folders under {out} to redo them")

        def plans() -> Iterator[ChannelPlan]:
            for channel in todo:
                resolved = resolve_dream_timesteps(stats_dir, channel, config.timesteps)
                timesteps, skipped = split_by_signal(model, resolved, config)
                if skipped:
                    result.skipped_timesteps[channel] = skipped
                if config.use_just_one_timestep:
                    timesteps = timesteps[:1]
                if not timesteps:
                    reason = ("no timesteps (no activity peaks / active timesteps)" if not resolved else
                              f"no timestep with signal: every timestep {resolved} lies below min_signal "
                              f"{config.min_signal}")
                    _empty_channel(out, channel, config, info, reason, skipped)
                    result.channels_without_timesteps.append(channel)
                    continue
                if use_prior:
                    prior_record = prior_record_path(priors_dir, channel)
                    if prior_record.is_file():
                        prior = json.loads(prior_record.read_text(encoding="utf-8"))
                        if prior.get("status") == "skipped":  # inactive or never steered: nothing to start from
                            _empty_channel(out, channel, config, info,
                                           f"prior skipped ({prior.get('reason')}): {prior.get('message', '')}")
                            result.channels_without_timesteps.append(channel)
                            continue
                    latents, seeds = load_prior_latents(priors_dir, channel, config.n_results)
                elif start_from == "example":
                    latents, seeds = example_start(channel, config.n_results)
                    if not seeds:
                        _empty_channel(out, channel, config, info, "no dataset example to start from")
                        result.channels_without_timesteps.append(channel)
                        continue
                else:
                    seeds = list(config.seeds[: config.n_results])
                    latents = model.initial_latents(seeds, *model.default_size)
                yield ChannelPlan(channel, timesteps, seeds, latents, skipped)

        pending: dict[int, tuple[ChannelPlan, dict[tuple[int, int], dict[str, Any]]]] = {}
        queue: list[tuple[ChannelPlan, int, int, int]] = []  # plan, timestep, seed, latent index
        written = 0
        plan_iter = plans()
        exhausted = False
        maco_magnitude = None

        with Progress(len(channels), "dreams", log=log, unit="channel", initial=len(result.channels_skipped)) as progress:
            while True:
                while not exhausted and len(queue) < batch_size:
                    plan = next(plan_iter, None)
                    if plan is None:
                        exhausted = True
                        break
                    pending[plan.channel] = (plan, {})
                    for timestep in plan.timesteps:
                        for index, seed in enumerate(plan.seeds):
                            queue.append((plan, timestep, seed, index))
                if not queue:
                    break
                batch, queue = queue[:batch_size], queue[batch_size:]
                init = torch.stack([plan.init_latents[index] for plan, _, _, index in batch])
                timesteps = torch.tensor([t for _, t, _, _ in batch], dtype=torch.long)
                objective = DreamObjective(torch.tensor([p.channel for p, _, _, _ in batch], dtype=torch.long), basis)
                generators = element_generators(
                    [element_seed(config.random_seed, p.channel, t, s) for p, t, s, _ in batch]
                )
                if config.parameterisation == "maco" and maco_magnitude is None:  # once per run
                    maco_magnitude = reference_magnitude(model, config.maco_reference_samples,
                                                         config.maco_reference_steps, config.random_seed)
                batch_result = optimise_dreams(model, layer, objective, init, timesteps, config, generators,
                                               maco_magnitude=maco_magnitude)
                final_activation = batch_result.final_activation
                last_step = config.num_steps
                for position, (plan, timestep, seed, _) in enumerate(batch):
                    steps = batch_result.steps_run(position)
                    snapshots = {s: latents[position] for s, latents in batch_result.snapshots.items()}
                    if config.snapshot_every and batch_result.failed[position] is None:
                        snapshots[last_step] = batch_result.latents[position]
                    pending[plan.channel][1][(timestep, seed)] = {
                        "latents": batch_result.latents[position],
                        "initial_latents": (batch_result.initial_latents[position]
                                            if batch_result.initial_latents is not None else None),
                        "snapshots": snapshots,
                        "stats": [
                            (int(s), {name: float(batch_result.history[name][s, position]) for name in STAT_NAMES})
                            for s in steps
                        ],
                        "final_activation": float(final_activation[position]),
                        "failed": batch_result.failed[position],
                        "failed_step": batch_result.failed_step[position],
                    }
                    result.element_steps += len(steps)
                result.elements += len(batch)
                for channel in list(pending):
                    plan, results = pending[channel]
                    if len(results) < plan.n_elements:
                        continue
                    failures = _write_channel(model, out, plan, results, config, root, info)
                    result.failures.extend(failures)
                    result.channels_done.append(channel)
                    del pending[channel]
                    progress.update()
                    written += 1
                    if failures and log:
                        log(f"dreams: channel {channel}: {len(failures)} element(s) failed, e.g. {failures[0]['reason']}")
                    if stop_after_channels is not None and written >= stop_after_channels:
                        break
                if stop_after_channels is not None and written >= stop_after_channels:
                    break
        result.seconds = time.monotonic() - start
        return result
