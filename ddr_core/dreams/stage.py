"""The dreams stage for one variant of the project configuration (:func:`dreams_for_variant`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ddr_core.channel_store import prior_record_path
from ddr_core.dreams.channel_files import finished_channels
from ddr_core.dreams.config import KEYWORD_TABLES, DreamConfig, LogFn
from ddr_core.dreams.quality import QUALITY_FILE, measure_dream_quality
from ddr_core.dreams.run import DreamsResult, run_dreams
from ddr_core.lazy_imports import lazy_module
from ddr_core.locks import format_channels
from ddr_core.performance import PerformanceConfig, performance_config, tuned_denoiser
from ddr_core.variant_inputs import load_variant_model, select_variant_channels

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def dreams_for_variant(
    project: Any,
    layout: Any,
    variant: str,
    channels: Sequence[int] | None,
    config: DreamConfig,
    device: torch.device | str,
    log: LogFn | None = None,
    stop_after_channels: int | None = None,
    stage: str = "dreams",
    lock_wait: bool | float = False,
    lock_owner: str = "",
    performance: PerformanceConfig | dict | None = None,
) -> DreamsResult:
    """Dream the channels of one variant: reads its priors and timestep statistics, writes
    ``layout.stage_dir(stage, variant)`` and its ``quality.parquet`` (``stage`` is ``dreams``, or
    ``dreams_no_noise`` for the run without schedule noise).

    Checks before optimising: the channel range and the upstream stages (the statistics tables the
    timestep keywords need, with ``start: prior`` a finished prior for every channel still to dream, with
    ``start: example`` the statistics' dataset examples (regenerated from the capture's recorded seeds):
    the error names ``timestep_stats[<variant>]`` / ``priors[<block>]`` to materialize), then the model
    folder, the layer, the SAE's ``d_in`` and the variant's width. ``channels=None`` means every
    channel of the variant. ``lock_wait``/``lock_owner``: see :func:`run_dreams`. ``performance``: how the
    denoiser computes during the optimisation (:mod:`ddr_core.performance`; ``None``: the plain eager path;
    it does not enter the dreams' config hash).

    Raises:
        IndexError: a channel outside the variant's declared width (before the model is loaded).
        FileNotFoundError: an upstream stage is missing (before the model is loaded).
        ChannelsLockedError: another live run is writing some of the channels.
        ddr_core.basis.WeightsChangedError: the model / SAE was provisioned again with other weights since
            the variant's capture (its statistics describe the old ones).
    """
    variant_channels = select_variant_channels(project, variant, channels)
    spec, layer_name, selected = variant_channels.spec, variant_channels.layer_name, variant_channels.channels
    stats_dir = layout.timestep_stats_dir(variant)
    out_dir = layout.stage_dir(stage, variant)
    priors_dir = layout.stage_dir("priors", variant) if config.start_from == "prior" else None
    capture_root = layout.activations_dir(project.capture_of(variant))
    if config.start_from == "example" and not (stats_dir / "dataset_examples.parquet").is_file():
        raise FileNotFoundError(f"start: example begins from the channels' top dataset examples, but "
                                f"{stats_dir / 'dataset_examples.parquet'} does not exist: materialize "
                                f"timestep_stats[{variant}] first")
    # The upstream stages, before the model is loaded; nothing is written when they are missing.
    keywords = [t for t in dict.fromkeys(config.timesteps) if isinstance(t, str)]
    absent = [k for k in keywords if not (stats_dir / f"{KEYWORD_TABLES.get(k, k)}.parquet").is_file()]
    if absent:
        missing_table = stats_dir / f"{KEYWORD_TABLES.get(absent[0], absent[0])}.parquet"
        raise FileNotFoundError(
            f"the timestep statistics of variant {variant!r} are missing ({missing_table} "
            f"does not exist) but the dream timesteps use {absent}: materialize timestep_stats[{variant}] "
            f"first (e.g. `dagster asset materialize -m dagster_project.definitions --select timestep_stats --partition {variant}`), or use "
            f"integer timesteps only"
        )
    if priors_dir is not None:
        finished = finished_channels(out_dir)
        missing = [c for c in selected
                   if c not in finished and not prior_record_path(priors_dir, c).is_file()]
        if missing:
            blocks = [f"priors[{variant}:{first}-{last}]" for first, last in spec.channel_blocks()
                      if any(first <= c <= last for c in missing)]
            raise FileNotFoundError(
                f"no finished priors for channel(s) {format_channels(missing)} of variant {variant!r} in "
                f"{priors_dir}: materialize {', '.join(blocks)} first, or set use_prior: false to start dreams "
                f"from seeded noise"
            )
    model, basis = load_variant_model(project, layout, variant, out_dir, "dreams folder", device, config.dtype)
    example_start = None
    if config.start_from == "example":
        from ddr_core.regenerate import example_starts

        def example_start(channel: int, n: int) -> tuple[torch.Tensor, list[int]]:
            return example_starts(model, capture_root, stats_dir, channel, n)

    performance = performance_config(performance)
    if log and not performance.is_default:
        log(f"denoiser performance options: {performance.describe()}")
    with tuned_denoiser(model.denoiser, performance,  # the optimisation only; quality re-measures plainly
                        hooked=model.hook_point(layer_name).module):
        result = run_dreams(
            model, basis, layer_name, stats_dir, priors_dir, selected, out_dir, config,
            data_root=layout.data_root, log=log, stop_after_channels=stop_after_channels,
            lock_wait=lock_wait, lock_owner=lock_owner, example_start=example_start,
        )
    result.quality = measure_dream_quality(model, basis, layer_name, out_dir, stats_dir, config, channels=selected)
    result.quality_path = out_dir / QUALITY_FILE
    return result
