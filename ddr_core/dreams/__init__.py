"""Deep dreams: latents optimised to maximise one channel (or SAE feature) at one timestep.

For a channel ``c`` of a UNet layer and a timestep ``t``, gradient ascent on a latent
``(batch, 4, h, w)`` maximises the channel's spatial-mean activation at the layer when the UNet
denoises that latent at ``t`` with the empty prompt. The UNet stops right after the layer
(:func:`~ddr_core.hooks.forward_to_layer`). Each step:

1. augment the latent (random jitter, rotation, zoom per element; :class:`LatentAugmentation`);
2. optionally add the scheduler's noise for ``t`` (``see_through_schedule_noise``);
3. loss = ``-activation + w_tv * TV + w_range * range + w_moment * moment`` per element
   (penalties on the un-augmented latent); the total loss is the sum over elements;
4. gradient w.r.t. the latent, then Fourier preconditioning and Gaussian smoothing per element;
5. an AdamW step.

**Start and objective.** ``start`` (:class:`DreamConfig`): ``prior`` (the priors' latents; ``use_prior``),
``noise`` (seeded noise) or ``example``: feature accentuation (Hamblin et al. 2024), the final latents of the
channel's top dataset examples regenerated from the capture's recorded seed and prompt
(:mod:`ddr_core.regenerate`); the element's seed is then the example's generation id. ``objective``:
``activation`` (default) or ``pre_activation`` (an SAE feature's encoder output before its ReLU: a gradient
where the feature is inactive); the recorded activation is always the real one.

**Batching.** A batch element is ``(channel, timestep, seed)``. The UNet takes a per-element timestep
tensor, so elements of many channels and timesteps share one forward pass. Penalties, gradient
transforms, augmentation and noise are per element and each element draws its random numbers from
its own generator (seeded from ``(random_seed, channel, timestep, seed)``), and AdamW is elementwise:
an element's result does not depend on which others share its batch (up to float rounding of
batched kernels). An element whose activation, loss, gradient or latent becomes NaN/inf stops
there: its latent is frozen at its last finite value and it is recorded as failed with the reason;
the others go on.

On disk (``out_dir``), one folder per channel, written atomically as a whole::

    channel_<c:05d>/
      t_<timestep:04d>/
        latents.safetensors   latents (n_seeds, 4, h, w) float32 final, initial_latents (same shape,
                              where the optimisation started: prior or seeded noise), seeds int64
        seed_<s>.png          final image per seed (VAE decode)
        stats.parquet         seed, step, activation, tv, range, moment, loss (one row per step run)
        steps/seed_<s>_step_<n:04d>.png   snapshots every ``snapshot_every`` steps (and the last)
      dream.json              written last: timesteps, seeds, final activations, failures, config,
                              skipped_timesteps (not dreamed: no signal there, see below)
      quality.parquet         added by :func:`measure_dream_quality` (this channel's rows)
    quality.parquet           union of the channels' quality rows, with each dream's raised verdict

**Timesteps without signal.** With schedule noise on, the latent reaches the layer as ``s_t * latent + noise``
(``s_t`` = :meth:`~ddr_core.families.ModelFamily.signal_fraction`), so the objective's gradient is scaled by
``s_t``; on a zero-terminal-SNR schedule it is 0 at the last timestep. Timesteps with ``s_t`` below
``DreamConfig.min_signal`` are not dreamed: each is recorded with its signal and reason
(:func:`~ddr_core.dreams.timesteps.split_by_signal`). **Raised.** A dream whose activation the optimiser did not
raise above the start's noise is not a picture of its channel: :func:`~ddr_core.dreams.quality.with_raised`
gives the verdict every reader (shards, inspector, HTML export, visual benchmark) uses.

and beside it ``.<out_dir name>.locks/``: the channel claims of live runs
(:func:`ddr_core.locks.claim_channels`) and ``quality.lock``, held while quality files are written.

A channel with ``dream.json`` is finished and skipped when the run resumes. A run claims its channels
for its whole duration: a second run on any of them fails at once naming the first (or waits), runs on
other channels of the same folder go on side by side; a resumed run deletes the temporary folders a
killed run left for its channels. The ranks of a multi-GPU job (:mod:`ddr_core.distributed`) are such
runs, one per round-robin share of the channels; rank 0 rewrites ``quality.parquet``
(:func:`write_quality_table`) once all of them are done.

The modules of this package:

- :mod:`ddr_core.dreams.config`: :class:`DreamConfig` (the stage's parameters) and :class:`DreamObjective`
  (what each batch element maximises);
- :mod:`ddr_core.dreams.parameterisations`: what is optimised (``DreamConfig.parameterisation``): the clean latent
  (default), the denoiser's x0-prediction, the sampler's initial noise through DDIM steps, or a phase with a fixed
  amplitude spectrum (MACO);
- :mod:`ddr_core.dreams.optimise`: one optimisation batch (:func:`optimise_dreams`) and the clean
  re-measurement (:func:`measure_activations`);
- :mod:`ddr_core.dreams.timesteps`: the timesteps each channel is dreamed at (:func:`resolve_dream_timesteps`);
- :mod:`ddr_core.dreams.channel_files`: a channel's start latents (the priors) and its folder;
- :mod:`ddr_core.dreams.run`: the run over channels (:func:`run_dreams`), resumable and claimed;
- :mod:`ddr_core.dreams.quality`: the quality measurement and ``quality.parquet``;
- :mod:`ddr_core.dreams.stage`: the stage for one variant of the project configuration (:func:`dreams_for_variant`).
"""

from __future__ import annotations

from ddr_core.dreams.channel_files import (
    ChannelPlan,
    finished_channels,
    load_prior_latents,
    prior_latents_path,
)
from ddr_core.dreams.config import (
    DEFAULT_SEEDS,
    STAT_NAMES,
    TIMESTEP_KEYWORDS,
    DreamConfig,
    DreamObjective,
    LogFn,
    TimestepKeyword,
)
from ddr_core.dreams.optimise import (
    DreamBatchResult,
    element_generators,
    element_seed,
    measure_activations,
    optimise_dreams,
)
from ddr_core.dreams.quality import (
    NOISE_SD_MULTIPLE,
    QUALITY_FILE,
    QUALITY_LOCK_FILE,
    QUALITY_SCHEMA,
    VERDICT_SCHEMA,
    measure_dream_quality,
    verdict_text,
    with_raised,
    write_quality_table,
)
from ddr_core.dreams.run import DreamsResult, check_dream_inputs, run_dreams
from ddr_core.dreams.stage import dreams_for_variant
from ddr_core.dreams.timesteps import resolve_dream_timesteps, split_by_signal

__all__ = [
    "ChannelPlan", "DEFAULT_SEEDS", "DreamBatchResult", "DreamConfig", "DreamObjective", "DreamsResult",
    "LogFn", "NOISE_SD_MULTIPLE", "QUALITY_FILE", "QUALITY_LOCK_FILE", "QUALITY_SCHEMA", "STAT_NAMES", "TIMESTEP_KEYWORDS",
    "TimestepKeyword", "VERDICT_SCHEMA", "check_dream_inputs", "dreams_for_variant", "element_generators", "element_seed",
    "finished_channels", "load_prior_latents", "measure_activations", "measure_dream_quality",
    "optimise_dreams", "prior_latents_path", "resolve_dream_timesteps", "run_dreams", "split_by_signal",
    "verdict_text", "with_raised", "write_quality_table",
]
