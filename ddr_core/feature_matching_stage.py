"""The ``feature_matches`` stage: read two variants' captures, match their features, write the tables.

For a comparison ``<A>__<B>`` (:mod:`ddr_core.comparisons`) it reads the conditional-half activations of both
variants from their activation stores (one store when both come from one capture group), checks that both hold
the same generations (prompt and seed of every ``generation_id``) at the same timesteps - before any matching -
and runs :func:`ddr_core.feature_matching.match_activations`; where both variants' units are directions in one
space, :func:`ddr_core.feature_matching.match_directions` too; where the prompts carry concept labels,
:func:`ddr_core.feature_matching_concepts.concept_diff`.

Output folder ``outputs/<experiment>/feature_matches/<A>__<B>/`` (written as a whole):

=====================  ===========================================================================================
``a_features.parquet``  one row per feature of A: its best match in B (``best``, ``r``, ``score``), the null
                        threshold, p, q, ``status`` (matched / vanished / silent), the Hungarian partner, and
                        both features' statistics side by side (mean, std, peak timestep)
``b_features.parquet``  the same from B's side (``status``: matched / appeared / silent)
``pairs.parquet``       the Hungarian one-to-one pairs, by score
``concepts.parquet``    (labelled prompts) per concept value: A's features selective for it, how many vanished,
                        chance, Fisher p / q, Wilson interval
``directions.parquet``  (same space) per feature of A: best |cosine| in B, its partner, the random-vector threshold
``summary.json``        counts, thresholds, settings (:func:`read_matches`)
=====================  ===========================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.activation_store import ActivationStore
from ddr_core.atomic import atomic_dir
from ddr_core.comparisons import parse_comparison_name, same_space
from ddr_core.feature_matching import (
    APPEARED,
    FEATURE_MATCHING_VERSION,
    MATCHED,
    SILENT,
    VANISHED,
    MatchingConfig,
    match_activations,
    match_directions,
)

A_FILE, B_FILE, PAIRS_FILE = "a_features.parquet", "b_features.parquet", "pairs.parquet"
CONCEPTS_FILE, DIRECTIONS_FILE, SUMMARY_FILE = "concepts.parquet", "directions.parquet", "summary.json"
MAX_BYTES = 8 * 1024**3
"""Refuse to load more activations than this (float64 of both variants); the error names the settings to lower."""


class CaptureMismatchError(ValueError):
    """The two variants' captures do not hold the same generations and timesteps."""


def matching_config(project: Any, name: str, run_config: dict[str, Any] | None = None) -> MatchingConfig:
    """The comparison's settings: its ``matching`` defaults in the project config, the run config's values over
    them (only those the run config sets)."""
    return MatchingConfig(**{**project.comparisons[name].matching, **(run_config or {})})


def _store(project: Any, layout: Any, variant: str) -> ActivationStore:
    group = project.capture_of(variant)
    store = ActivationStore(layout.activations_dir(group))
    if not store.root.is_dir() or not store.finished_batches():
        raise FileNotFoundError(f"variant {variant!r} has no capture at {store.root}: materialize "
                                f"activations[{group}] first")
    return store


def check_same_generations(name: str, stores: tuple[ActivationStore, ActivationStore],
                           variants: tuple[str, str]) -> pl.DataFrame:
    """The generations both captures hold (sorted by id), after checking that every ``generation_id`` has the
    same prompt and seed in both and that both recorded the same timesteps.

    Raises:
        CaptureMismatchError: naming what differs and the fix (capture both with one run config).
    """
    fix = (f"materialize both captures with the same activations run config (seed, num_images_per_prompt, "
           f"num_inference_steps, n_prompts) so comparison {name!r} sees the same generations")
    frames = [store.read_generations().select("generation_id", "prompt_index", "prompt", "seed") for store in stores]
    if stores[0].root == stores[1].root:
        return frames[0]
    ids = [set(frame["generation_id"].to_list()) for frame in frames]
    if ids[0] != ids[1]:
        raise CaptureMismatchError(f"{variants[0]!r} has {len(ids[0])} generations and {variants[1]!r} "
                                   f"{len(ids[1])}, {len(ids[0] ^ ids[1])} of them in only one; {fix}")
    joined = frames[0].join(frames[1], on="generation_id", suffix="_b")
    differ = joined.filter((pl.col("prompt") != pl.col("prompt_b")) | (pl.col("seed") != pl.col("seed_b")))
    if differ.height:
        first = differ.row(0, named=True)
        raise CaptureMismatchError(
            f"{differ.height} generation(s) differ between {variants[0]!r} and {variants[1]!r}, e.g. generation "
            f"{first['generation_id']}: prompt {first['prompt']!r} seed {first['seed']} vs prompt "
            f"{first['prompt_b']!r} seed {first['seed_b']}; {fix}")
    steps = [store.timesteps() for store in stores]
    if not np.array_equal(steps[0], steps[1]):
        raise CaptureMismatchError(f"{variants[0]!r} recorded timesteps {steps[0].tolist()[:8]}... and "
                                   f"{variants[1]!r} {steps[1].tolist()[:8]}...; {fix}")
    return frames[0].sort("generation_id")


def _dense(store: ActivationStore, variant: str, ids: np.ndarray, stride: int) -> np.ndarray:
    """``(g, T', F)`` float32 conditional activations of the generations ``ids`` (sorted), every ``stride``-th
    timestep."""
    position = {int(g): i for i, g in enumerate(ids)}
    out: np.ndarray | None = None
    for generation_ids, _, values in store.iter_dense(variant, "conditional"):
        if out is None:
            out = np.zeros((len(ids), len(range(0, values.shape[1], stride)), values.shape[2]), dtype=np.float32)
        for row, g in enumerate(generation_ids):
            if int(g) in position:
                out[position[int(g)]] = values[row, ::stride]
    assert out is not None  # _store checked that a finished batch exists
    return out


def _feature_stats(values: np.ndarray, timesteps: np.ndarray) -> dict[str, np.ndarray]:
    per_step = values.mean(axis=0)  # (T, F)
    return {"mean": values.mean(axis=(0, 1)), "std": values.std(axis=(0, 1)),
            "peak_timestep": timesteps[per_step.argmax(axis=0)]}


def _directions(project: Any, layout: Any, variant: str, layer_width: int | None) -> np.ndarray | None:
    """``(F, C)`` unit directions of ``variant`` in its layer (raw: one-hot rows; an SAE: its decoder rows), or
    ``None`` when the layer's width is unknown (two SAE variants of a kind that needs it)."""
    from ddr_core.basis import basis_class

    spec = project.variants[variant]
    if spec.basis == "raw":
        return np.eye(spec.width)
    if layer_width is None and spec.basis == "sae":
        from ddr_core.sae import find_sae_folder, load_sae

        sae = load_sae(find_sae_folder(layout.sae_dir(spec.sae), project.layer_of(variant)))
        return sae.W_dec.detach().float().cpu().numpy()
    if layer_width is None:
        return None
    basis = basis_class(spec.basis).load(layout.sae_dir(spec.sae), project.layer_of(variant), layer_width, "cpu")
    return basis.directions(list(range(spec.width))).numpy()


def _side_frame(side: Any, stats: dict[str, np.ndarray], other_stats: dict[str, np.ndarray],
                partner: dict[int, int], partner_score: dict[int, float], top: np.ndarray) -> pl.DataFrame:
    best = side.best
    ok = best >= 0
    take = lambda values: np.where(ok, values[np.where(ok, best, 0)], np.nan)  # noqa: E731
    return pl.DataFrame({
        "feature": np.arange(best.size, dtype=np.int64), "status": side.status, "best": best,
        "r": side.signed, "score": side.score, "null_threshold": side.null_threshold,
        "p_value": side.p_value, "q_value": side.q_value,
        "second_best": top[:, 1] if top.shape[1] > 1 else np.full(best.size, -1),
        "hungarian": np.array([partner.get(i, -1) for i in range(best.size)], dtype=np.int64),
        "hungarian_score": np.array([partner_score.get(i, np.nan) for i in range(best.size)]),
        "mean": stats["mean"], "std": stats["std"], "peak_timestep": stats["peak_timestep"],
        "best_mean": take(other_stats["mean"]), "best_std": take(other_stats["std"]),
        "best_peak_timestep": take(other_stats["peak_timestep"].astype(np.float64)),
    })


def feature_matches_for_comparison(project: Any, layout: Any, name: str, out_dir: str | Path,
                                   config: MatchingConfig | None = None,
                                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Match comparison ``name`` and write its folder ``out_dir`` (see the module docstring); returns the summary.

    Raises:
        KeyError: an unknown comparison. FileNotFoundError: a capture is missing. CaptureMismatchError: the
        captures hold different generations or timesteps. MemoryError: more activations than :data:`MAX_BYTES`.
    """
    if name not in project.comparisons:
        raise KeyError(f"unknown comparison {name!r}; declared: {sorted(project.comparisons)}")
    config = config or matching_config(project, name)
    a, b = parse_comparison_name(name)
    stores = (_store(project, layout, a), _store(project, layout, b))
    generations = check_same_generations(name, stores, (a, b))
    if config.max_generations is not None:
        generations = generations.head(config.max_generations)
    ids = generations["generation_id"].to_numpy()
    timesteps = stores[0].timesteps()[:: config.timestep_stride]
    need = len(ids) * len(timesteps) * (project.variants[a].width + project.variants[b].width) * 8 * 3
    if need > MAX_BYTES:
        raise MemoryError(f"comparison {name!r} would hold about {need / 1024**3:.1f} GiB of activations; lower "
                          f"max_generations (now {config.max_generations}) or raise timestep_stride (now "
                          f"{config.timestep_stride}) in its run config")
    values_a = _dense(stores[0], a, ids, config.timestep_stride)
    values_b = _dense(stores[1], b, ids, config.timestep_stride)
    prompts = generations["prompt"].to_list()
    prompt_ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    groups = np.array([prompt_ids[p] for p in prompts])
    if log:
        log(f"matching {a} ({values_a.shape[2]} units) with {b} ({values_b.shape[2]}) over {len(ids)} generations "
            f"x {len(timesteps)} timesteps, {config.n_permutations} prompt shuffles")
    result = match_activations(values_a, values_b, groups, config)
    stats_a, stats_b = _feature_stats(values_a, timesteps), _feature_stats(values_b, timesteps)
    rows, cols = result.hungarian
    score = np.abs(result.correlation) if config.absolute else result.correlation
    pair_score = score[rows, cols]
    top_a = np.argsort(-score, axis=1)[:, :2]
    top_b = np.argsort(-score.T, axis=1)[:, :2]
    frame_a = _side_frame(result.a, stats_a, stats_b, dict(zip(rows.tolist(), cols.tolist(), strict=True)),
                          dict(zip(rows.tolist(), pair_score.tolist(), strict=True)), top_a)
    frame_b = _side_frame(result.b, stats_b, stats_a, dict(zip(cols.tolist(), rows.tolist(), strict=True)),
                          dict(zip(cols.tolist(), pair_score.tolist(), strict=True)), top_b)
    pairs = pl.DataFrame({"a": rows, "b": cols, "r": result.correlation[rows, cols], "score": pair_score,
                          "a_status": [result.a.status[i] for i in rows],
                          "b_status": [result.b.status[j] for j in cols]}).sort("score", descending=True)
    concepts = _concepts(project, layout, a, values_a, groups, prompts, result.a.status, config, result.a.score)
    directions, direction_summary = None, None
    if same_space(project, name):
        raw_width = next((project.variants[v].width for v in (a, b) if project.variants[v].basis == "raw"), None)
        dir_a, dir_b = _directions(project, layout, a, raw_width), _directions(project, layout, b, raw_width)
        if dir_a is not None and dir_b is not None:
            found = match_directions(dir_a, dir_b, config.alpha, config.direction_null_draws, config.seed)
            directions = pl.DataFrame({
                "feature": np.arange(dir_a.shape[0]), "best": found.best_a, "cosine": found.score_a,
                "above_chance": found.score_a > found.null_threshold_a,
                "activation_best": result.a.best, "same_as_activation_best": found.best_a == result.a.best})
            direction_summary = {"null_threshold_a": found.null_threshold_a, "null_threshold_b": found.null_threshold_b,
                                 "above_chance_a": int((found.score_a > found.null_threshold_a).sum()),
                                 "above_chance_b": int((found.score_b > found.null_threshold_b).sum()),
                                 "agree_with_activation": int((found.best_a == result.a.best).sum())}
    summary = {
        "comparison": name, "a": a, "b": b, "version": FEATURE_MATCHING_VERSION,
        "config": config.model_dump(), "generations": len(ids), "timesteps": len(timesteps),
        "prompts": result.n_groups, "samples": result.n_samples,
        "width_a": int(values_a.shape[2]), "width_b": int(values_b.shape[2]),
        "counts_a": {s: result.a.status.count(s) for s in (MATCHED, VANISHED, SILENT)},
        "counts_b": {s: result.b.status.count(s) for s in (MATCHED, APPEARED, SILENT)},
        "null_pooled_threshold": result.null_pooled_threshold,
        "hungarian_pairs": len(rows), "hungarian_mean_score": float(np.nanmean(pair_score)) if len(rows) else None,
        "directions": direction_summary,
        "concepts": concepts is not None,
    }
    with atomic_dir(out_dir) as tmp:
        frame_a.write_parquet(tmp / A_FILE)
        frame_b.write_parquet(tmp / B_FILE)
        pairs.write_parquet(tmp / PAIRS_FILE)
        if concepts is not None:
            concepts.write_parquet(tmp / CONCEPTS_FILE)
        if directions is not None:
            directions.write_parquet(tmp / DIRECTIONS_FILE)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=float) + "\n", encoding="utf-8")
    return summary


def _concepts(project: Any, layout: Any, variant: str, values: np.ndarray, groups: np.ndarray, prompts: list[str],
              status: list[str], config: MatchingConfig, scores: np.ndarray) -> pl.DataFrame | None:
    """The concept diff of A's features (:func:`ddr_core.feature_matching_concepts.concept_diff`), or ``None`` for
    prompts without labels."""
    from ddr_core.feature_concepts.labels import prompt_labels
    from ddr_core.feature_matching_concepts import concept_diff, prompt_means
    from ddr_core.paths import file_inside

    spec = project.variants[variant]
    dataset = project.prompt_datasets[spec.prompts]
    if dataset.labels is None:
        return None
    table = prompt_labels(file_inside(layout.prompts_dir(spec.prompts), dataset.file,
                                      f"prompt_datasets.{spec.prompts}.file"), dataset.labels, dataset.text_field,
                          prompts=list(dict.fromkeys(prompts)))
    by_prompt = {row["prompt"]: row for row in table.iter_rows(named=True)}
    ordered = list(dict.fromkeys(prompts))
    ids, means = prompt_means(values, groups)
    labels = [{f: by_prompt.get(ordered[i], {}).get(f) for f in dataset.labels.families} for i in ids]
    families = {f: list(dict.fromkeys(lab[f] for lab in labels if lab[f] is not None)) for f in dataset.labels.families}
    rows = concept_diff(status, means, labels, families, config.alpha, seed=config.seed, scores=scores)
    lists = {"selective_features": pl.List(pl.Int64), "vanished_features": pl.List(pl.Int64)}
    return pl.DataFrame(rows, schema_overrides=lists) if rows else None


def read_matches(folder: str | Path) -> dict[str, Any]:
    """A written comparison: ``{"summary", "a", "b", "pairs", "concepts", "directions"}`` (frames; ``None`` where
    absent).

    Raises:
        FileNotFoundError: no ``summary.json`` (``feature_matches`` has not run for it).
    """
    folder = Path(folder)
    if not (folder / SUMMARY_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {SUMMARY_FILE}: materialize feature_matches first")
    read = lambda name: pl.read_parquet(folder / name) if (folder / name).is_file() else None  # noqa: E731
    return {"summary": json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8")), "a": read(A_FILE),
            "b": read(B_FILE), "pairs": read(PAIRS_FILE), "concepts": read(CONCEPTS_FILE),
            "directions": read(DIRECTIONS_FILE)}
