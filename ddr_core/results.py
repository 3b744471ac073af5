"""Reading an experiment's results in Python (a notebook), without Dagster: :class:`Results`.

>>> from ddr_core.results import Results
>>> results = Results("data")                      # the data root; experiment from DDR_EXPERIMENT / the config
>>> results.variants()                             # ['toy-world-raw', 'toy-world-sae', ...]
>>> results.channels("toy-world-raw")              # one row per channel: activity, peaks, concept verdicts
>>> results.examples("toy-world-raw", 5)           # its top dataset examples (prompt, timestep, activation)
>>> results.dreams("toy-world-raw", 5)             # its dreams (timestep, seed, final activation, image path)
>>> results.image(results.priors("toy-world-raw", 5)["image"][0])   # a PIL image
>>> results.labels("toy-world-raw")                # automatic labels and their held-out detection scores
>>> results.cfg_truth("toy-world-raw")             # is the text effect about the channel's own concept?

Everything is read from the files the stages wrote (statistics tables, representation shards and index,
``feature_concepts``, ``feature_labels``, ``cfg_contrast``), through the same readers and path checks as the
inspector: a path recorded in a file is opened only inside the data root, and a variant name is checked before it
becomes a path. Frames are Polars; convert with ``.to_pandas()`` where a tool wants pandas.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

from ddr_core.paths import DataLayout

STATISTICS_TABLES = ("channels", "frequency", "max_activation", "active_timesteps", "activity_peaks",
                     "dataset_examples")
"""The timestep-statistics tables :meth:`Results.statistics` reads (Parquet files of the stage)."""


class Results:
    """The results of one experiment under one data root.

    Args:
        data_root: the data root (default ``DDR_DATA_ROOT``, else the project's ``data/``).
        experiment: the experiment (default ``DDR_EXPERIMENT``, else the config file's ``experiment``).
    """

    def __init__(self, data_root: str | Path | None = None, experiment: str | None = None):
        from ddr_core.config import data_root as default_data_root

        if experiment is None:
            experiment = os.environ.get("DDR_EXPERIMENT") or _config_experiment()
        self.layout = DataLayout(Path(data_root) if data_root is not None else default_data_root(), experiment)

    def __repr__(self) -> str:
        return f"Results({str(self.layout.data_root)!r}, experiment={self.layout.experiment!r})"

    # --------------------------------------------------------------------------------------- variants
    def variants(self) -> list[str]:
        """Variants with finished timestep statistics or a representation index."""
        from ddr_core.representation import list_variants

        return list_variants(self.layout)

    def summary(self, variant: str) -> dict[str, Any]:
        """The timestep statistics' ``summary.json`` of ``variant`` (width, timesteps, generations, ...)."""
        from ddr_core.statistics import read_summary

        return read_summary(self.layout.timestep_stats_dir(variant))

    def channels(self, variant: str) -> pl.DataFrame:
        """One row per channel: activity, peaks, dream quality (the representation index; built in memory when
        the ``representation_shards`` stage has not written it), joined with the ``feature_concepts`` verdicts
        (``concept``, ``n_concepts``, ``p_*`` / ``q_*``) when that stage ran."""
        from ddr_core.representation import load_index_or_rebuild

        index, _ = load_index_or_rebuild(self.layout, variant)
        concepts = self.concepts(variant)
        if concepts is None:
            return index
        extra = [c for c in concepts.columns if c == "channel" or c not in index.columns]
        return index.join(concepts.select(extra), on="channel", how="left")

    def statistics(self, variant: str, table: str = "channels") -> pl.DataFrame:
        """A timestep-statistics table of ``variant`` (one of :data:`STATISTICS_TABLES`)."""
        if table not in STATISTICS_TABLES:
            raise ValueError(f"unknown statistics table {table!r}; choose one of {', '.join(STATISTICS_TABLES)}")
        path = self.layout.timestep_stats_dir(variant) / f"{table}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: materialize timestep_stats[{variant}] first")
        return pl.read_parquet(path)

    def concepts(self, variant: str) -> pl.DataFrame | None:
        """The ``feature_concepts`` table of ``variant`` (ground-truth purity, agreement, verdicts), or ``None``
        when that stage has not run for it (only variants with labelled prompts have one)."""
        from ddr_core.feature_concepts import TABLE_FILE, feature_concepts_dir

        path = feature_concepts_dir(self.layout, variant) / TABLE_FILE
        return pl.read_parquet(path) if path.is_file() else None

    def cfg_contrast(self, variant: str, table: str = "channels") -> pl.DataFrame | None:
        """The conditional-vs-unconditional table of ``variant`` (``channels``: one row per channel with the
        prompt's effect, its interval and p over prompts and a verdict; ``profiles``: channel x timestep), or
        ``None`` for a capture with one CFG half (no guidance). Raises where ``cfg_contrast`` has not run."""
        from ddr_core.cfg_contrast import CHANNELS_FILE, PROFILES_FILE, read_cfg_contrast

        files = {"channels": CHANNELS_FILE, "profiles": PROFILES_FILE}
        if table not in files:
            raise ValueError(f"unknown cfg_contrast table {table!r}; choose one of {', '.join(files)}")
        folder = self.layout.stage_dir("cfg_contrast", variant)
        summary = read_cfg_contrast(folder)
        if summary is None:
            raise FileNotFoundError(f"{folder} has no summary.json: materialize cfg_contrast[{variant}] first")
        return pl.read_parquet(folder / files[table]) if summary["halves"] == 2 else None

    def labels(self, variant: str) -> pl.DataFrame | None:
        """The ``feature_labels`` table of ``variant``: one row per feature with its automatic ``label``, the
        held-out detection ``score`` (balanced accuracy, ``chance`` 0.5), ``score_low`` / ``score_high``, ``p_value``
        / ``q_value`` / ``significant`` and, on the toy world, ``concept`` / ``label_matches``; ``None`` when that
        stage has not run for it (only variants whose model names a ``labeller``). Labels are untrusted text."""
        found = self._feature_labels(variant)
        return None if found is None else found[0]

    def labels_summary(self, variant: str) -> dict[str, Any] | None:
        """The ``feature_labels`` summary of ``variant`` (labeller, features scored, mean score and its interval,
        significant count, the truth check), or ``None`` when that stage has not run for it."""
        found = self._feature_labels(variant)
        return None if found is None else found[1]

    def _feature_labels(self, variant: str) -> tuple[pl.DataFrame, dict[str, Any]] | None:
        from ddr_core.labels import feature_labels_dir, read_feature_labels

        return read_feature_labels(feature_labels_dir(self.layout, variant))

    def cfg_truth(self, variant: str, project: Any = None, **options: Any) -> dict[str, Any] | None:
        """``cfg_contrast`` scored on the toy world's truth (:func:`ddr_core.cfg_truth.cfg_truth_for_variant`): do
        prompts naming a selective channel's concept move it more than other prompts (``effect`` in sd, its
        ``interval`` over prompts, ``p_value`` with prompts permuted, ``families``)? ``None`` where the variant's
        prompts carry no labels, ``feature_concepts`` or a two-half ``cfg_contrast`` is missing. ``project``: the
        project config (default: the config file, as the stages read it); ``options``: ``permutations``,
        ``bootstraps``, ``confidence``, ``seed``."""
        from ddr_core.cfg_truth import cfg_truth_for_variant
        from ddr_core.config import load_project_config
        from ddr_core.paths import check_name

        project = load_project_config() if project is None else project
        if check_name(variant, "variant") not in project.variants:
            raise KeyError(f"unknown variant {variant!r}; the config has {', '.join(sorted(project.variants))}")
        return cfg_truth_for_variant(project, self.layout, variant, **options)
    # ------------------------------------------------------------------------------------- comparisons
    def comparisons(self) -> list[str]:
        """Comparisons ``<variant A>__<variant B>`` with a finished ``feature_matches`` folder (docs/MATCHING.md)."""
        from ddr_core.matching_view import finished_comparisons

        return finished_comparisons(self.layout)

    def feature_matches(self, comparison: str, table: str = "a") -> pl.DataFrame | None:
        """A ``feature_matches`` table of ``comparison``: ``a`` (one row per feature of A: best match in B, r,
        null threshold, p, q, status matched / vanished / silent, both features' statistics), ``b`` (the same
        from B's side: matched / appeared / silent), ``pairs`` (Hungarian pairs), ``concepts`` (labelled prompts:
        per concept value, A's selective features that vanished vs chance) or ``directions`` (one space only);
        ``None`` for a table the comparison does not have. Raises where the stage has not run."""
        from ddr_core.feature_matching_stage import read_matches

        tables = ("a", "b", "pairs", "concepts", "directions")
        if table not in tables:
            raise ValueError(f"unknown feature_matches table {table!r}; choose one of {', '.join(tables)}")
        return read_matches(self.layout.stage_dir("feature_matches", comparison))[table]

    # ---------------------------------------------------------------------------------------- channels
    def shard(self, variant: str, channel: int) -> dict[str, Any]:
        """Everything about one channel as the inspector reads it (the representation shard, checked)."""
        from ddr_core.representation import load_shard

        return load_shard(self.layout, variant, int(channel))

    def curves(self, variant: str, channel: int) -> pl.DataFrame:
        """``timestep, activity, max_activation`` of ``channel`` on every timestep."""
        from ddr_core.representation import curves_or_observed

        frame, _ = curves_or_observed(self.layout, self.shard(variant, channel))
        return frame

    def examples(self, variant: str, channel: int) -> pl.DataFrame:
        """The channel's top dataset examples: ``rank, prompt, generation_id, timestep, activation, image``."""
        rows = self.shard(variant, channel)["examples"]
        return pl.DataFrame(rows, schema={"rank": pl.Int64, "prompt": pl.String, "generation_id": pl.Int64,
                                          "timestep": pl.Int64, "activation": pl.Float64, "image": pl.String})

    def priors(self, variant: str, channel: int) -> pl.DataFrame:
        """The channel's priors (steered generations): ``seed, image`` (empty when none were made; the shard's
        ``priors.status`` / ``reason`` say why)."""
        section = self.shard(variant, channel).get("priors") or {}
        return pl.DataFrame(section.get("images") or [], schema={"seed": pl.Int64, "image": pl.String})

    def dreams(self, variant: str, channel: int) -> pl.DataFrame:
        """The channel's dreams: ``run, timestep, seed, final_activation, failed, failure_reason, image``: only
        those that raised the channel above their start's noise (:mod:`ddr_core.dream_verdict`); the shard's
        ``dreams[run]["not_raised"]`` / ``["skipped_timesteps"]`` list the others with their numbers."""
        rows = []
        for run, section in (self.shard(variant, channel).get("dreams") or {}).items():
            for result in (section or {}).get("results") or []:
                rows.append({"run": run, "timestep": result.get("timestep"), "seed": result.get("seed"),
                             "final_activation": result.get("final_activation"), "failed": result.get("failed"),
                             "failure_reason": result.get("failure_reason"), "image": result.get("image")})
        return pl.DataFrame(rows, schema={"run": pl.String, "timestep": pl.Int64, "seed": pl.Int64,
                                          "final_activation": pl.Float64, "failed": pl.Boolean,
                                          "failure_reason": pl.String, "image": pl.String})

    # ------------------------------------------------------------------------------------------- files
    def path(self, relative: str) -> Path:
        """The file a result names (a path relative to the data root), refused when it leads outside it."""
        from ddr_core.representation import resolve_file

        return resolve_file(self.layout.data_root, relative, "result file")

    def image(self, relative: str) -> Any:
        """The PNG a result names, as a PIL image (loaded, so the file is closed)."""
        from PIL import Image

        with Image.open(self.path(relative)) as image:
            image.load()
            return image.copy()


def _config_experiment() -> str:
    from ddr_core.config import load_project_config

    return load_project_config().experiment
