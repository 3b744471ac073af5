"""Representation: everything known about one channel gathered into one shard, plus a per-variant index.

The inspector (``ddr_core/inspector_app.py``) and the static HTML export (``ddr_core/html_export.py``)
read only what this module writes (or builds in memory the same way). For a variant it joins

- the timestep statistics (``layout.timestep_stats_dir(variant)``): per-channel summary, activity
  profile and maximum activation at the observed timesteps, activity peaks, dataset examples;
- the priors (``layout.stage_dir("priors", variant)/channel_<c:05d>/prior.json``), when present;
- the deep dreams of the ``"noise"`` run (``stage_dir("dreams", variant)``) and the optional
  ``"no_noise"`` run (``stage_dir("dreams_no_noise", variant)``): per (timestep, seed) the final image,
  the latents, the final statistics, the intermediate snapshots (``steps/seed_<s>_step_<n:04d>.png``)
  with the statistics at their step, and the run's ``quality.parquet`` rows; when present.

On disk (``layout.stage_dir("representation", variant)``), JSON and Parquet only, never pickle::

    channel_<c:05d>.json          one shard per channel (format :data:`SHARD_FORMAT`, fields below)
    curves/channel_<c:05d>.parquet  timestep (0..total_timesteps-1), activity, max_activation
    index.parquet                 one row per channel of the variant (:data:`INDEX_COLUMNS`)
    index.json                    summary: total / active channels, observed timesteps, counts

Shard fields: ``format, variant, experiment, channel, total_timesteps, observed_timesteps`` (denoising
order), ``summary`` (the ``channels.parquet`` row), ``observed`` (``timestep, frequency,
max_activation`` lists at the observed timesteps), ``curves`` (relative path of the interpolated
curves), ``peaks`` (``rank, timestep, height, plateau_start, plateau_end, observed_timestep``),
``examples`` (``timestep, rank, generation_id, activation, prompt, image``), ``priors`` (``None`` or
``status, reason, message, seeds, images [{seed, image, verdict}], latents, steered_timesteps, strengths``;
``verdict``: the prior against the unsteered generation of its seed, plain text, :mod:`ddr_core.prior_gain`),
``dreams`` (run name -> ``None`` or ``skipped, timesteps, seeds, failures, results [{timestep, seed,
image, latents, stats, final_activation, failed, failure_reason, final_stats, steps [{step, image,
activation, tv, range, moment, loss}]}]``), ``quality`` (run name -> quality rows of the channel),
``visualised_timesteps`` (timesteps with dreams), ``timesteps_with_data`` (with examples or dreams,
descending) and ``errors`` (``[{file, what, problem}]``: referenced files that are missing or unsafe).

Concurrent runs and crashes: every file is written atomically (a reader sees the old or the new file,
never half of one). :func:`build_shards` claims its channels for the run
(:func:`ddr_core.locks.claim_channels`, lock files in ``.<representation dir>.locks/`` beside it): a second
run on any of them fails at once naming the first (or waits ``lock_wait`` seconds), runs on other
channels go on side by side, and a run deletes the temporaries a killed run left for its own channels.
:func:`build_index` writes the index under ``index.lock`` there (waiting for another run's index) and
deletes killed runs' index temporaries.

Every stored path is POSIX and relative to the data root. Readers go through
:func:`resolve_file`, i.e. :func:`ddr_core.paths.resolve_inside`: a crafted shard cannot make a reader
open a file outside the data root.

The modules of this package (none imports torch: the inspector and the HTML export read through it):

- :mod:`ddr_core.representation.files`: formats and stage names, where shards, curves and the index lie,
  the errors of reading them, and :func:`resolve_file` (a stored path resolved inside the data root);
- :mod:`ddr_core.representation.upstream`: reading the upstream stages (statistics, priors, dreams, quality);
- :mod:`ddr_core.representation.shards`: building the shards and curves of a variant's channels
  (:func:`make_shards`, :func:`build_shards`);
- :mod:`ddr_core.representation.shard_reader`: the shard schema checked on every read (:func:`check_shard`)
  and the readers of shards and curves (:func:`load_shard`, :func:`load_curves`);
- :mod:`ddr_core.representation.index`: the per-variant index (:func:`build_index`, :func:`load_index`) and
  the prompt search (:func:`search_channels`);
- :mod:`ddr_core.representation.stage`: the stage for one variant (:func:`representation_for_variant`).
"""

from __future__ import annotations

from ddr_core.representation.files import (
    DREAM_RUNS,
    DREAM_STAT_NAMES,
    INDEX_FORMAT,
    PRIORS_STAGE,
    REPRESENTATION_STAGE,
    SHARD_FORMAT,
    BadShardError,
    MissingStatsError,
    ShardFileError,
    check_image,
    curves_path,
    display_path,
    list_variants,
    representation_dir,
    resolve_file,
    shard_path,
    try_resolve_file,
)
from ddr_core.representation.index import (
    INDEX_COLUMNS,
    INDEX_SCHEMA,
    TOP_PROMPTS_PER_CHANNEL,
    build_index,
    check_index,
    load_index,
    load_index_or_rebuild,
    make_index_table,
    search_channels,
)
from ddr_core.representation.shard_reader import (
    check_shard,
    curves_or_observed,
    load_curves,
    load_shard,
    observed_curves,
)
from ddr_core.representation.shards import (
    LogFn,
    ShardsSummary,
    build_shards,
    interpolated_curves,
    make_shards,
)
from ddr_core.representation.stage import representation_for_variant

__all__ = [
    "BadShardError", "DREAM_RUNS", "DREAM_STAT_NAMES", "INDEX_COLUMNS", "INDEX_FORMAT", "INDEX_SCHEMA",
    "LogFn", "MissingStatsError", "PRIORS_STAGE", "REPRESENTATION_STAGE", "SHARD_FORMAT", "ShardFileError",
    "ShardsSummary", "TOP_PROMPTS_PER_CHANNEL", "build_index", "build_shards", "check_image", "check_index",
    "check_shard", "curves_or_observed", "curves_path", "display_path", "interpolated_curves",
    "list_variants", "load_curves", "load_index", "load_index_or_rebuild", "load_shard", "make_index_table",
    "make_shards", "observed_curves", "representation_dir", "representation_for_variant", "resolve_file",
    "search_channels", "shard_path", "try_resolve_file",
]
