"""The feature-labels stage for one variant of the project configuration (:func:`feature_labels_for_variant`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.labels.compute import (
    FeatureLabelsConfig,
    LogFn,
    concept_values,
    label_block,
    summarise_labels,
    with_q_values,
    write_feature_labels,
)

IMAGES_PER_CHUNK = 64
"""Images read and encoded at a time (48 MiB of 512 px RGB images; rounded up to a multiple of the labeller's
``batch_size``, so its batches, and its rows, are the ones of a single call over every image)."""


def feature_labels_dir(layout: Any, variant: str) -> Path:
    return layout.stage_dir("feature_labels", variant)


def best_prompt_activations(store: Any, variant: str, stats_dir: Path) -> pl.DataFrame:
    """``channel, prompt, generation_id, activation``: per channel and prompt its best generation at the channel's
    top activity peak (the ranking of :mod:`ddr_core.feature_concepts`' top examples, every prompt kept).
    Holds generations x channels rows: the stage streams blocks of channels instead
    (:func:`ddr_core.labels.streaming.best_prompt_blocks`, the same rows); kept as the in-memory reference."""
    from ddr_core.feature_concepts.purity import _best_prompts, _top_peak_timesteps, peak_activations

    prompts = store.read_generations().select(pl.col("generation_id").cast(pl.Int64), "prompt")
    frame = peak_activations(store, variant, _top_peak_timesteps(stats_dir)).join(prompts, on="generation_id",
                                                                                  how="left")
    return _best_prompts(frame, None).select("channel", "prompt", "generation_id", "activation")


def feature_labels_for_variant(project: Any, layout: Any, variant: str, config: FeatureLabelsConfig | None = None,
                               *, log: LogFn | None = None, out_dir: str | Path | None = None,
                               labeller: Any | None = None) -> tuple[pl.DataFrame, dict[str, Any], Path]:
    """Label every channel / SAE feature of ``variant`` with its model's labeller (``models.<m>.labeller``) and
    score each label; writes ``feature_labels/<variant>/`` (or ``out_dir``). ``labeller``: one already built
    (tests); default: built from the config entry (a clip labeller's weights are provisioned first).

    Raises:
        ValueError: the variant's model names no labeller (names the config field).
        FileNotFoundError: the statistics or the capture's images are missing (names what to run).
    """
    from ddr_core.activation_store import ActivationStore
    from ddr_core.atomic import TEMP_MARKER
    from ddr_core.feature_concepts import (
        feature_concepts_dir,
        prompt_labels,
        read_feature_concepts,
    )
    from ddr_core.feature_concepts.purity import _top_peak_timesteps
    from ddr_core.labels.protocol import LabellerContext, make_labeller
    from ddr_core.labels.streaming import best_prompt_blocks, plan_label_blocks
    from ddr_core.paths import file_inside
    from ddr_core.statistics import require_statistics

    config = config or FeatureLabelsConfig()
    say = log or (lambda _message: None)
    if variant not in project.variants:
        raise KeyError(f"unknown variant {variant!r}; declared: {sorted(project.variants)}")
    spec = project.variants[variant]
    name = project.models[spec.model].labeller
    if name is None and labeller is None:
        raise ValueError(f"variant {variant!r}: model {spec.model!r} names no labeller; add `labeller: <name>` under "
                         f"models.{spec.model} (one of labellers: {sorted(project.labellers)})")
    stats_dir = layout.timestep_stats_dir(variant)
    require_statistics(stats_dir, variant)
    layout.check_output_folder(feature_labels_dir(layout, variant), "feature_labels folder")
    store = ActivationStore(layout.activations_dir(project.capture_of(variant)))
    if not store.root.is_dir():
        raise FileNotFoundError(f"the capture of variant {variant!r} ({store.root}) is missing: materialize "
                                f"activations[{project.capture_of(variant)}] first")
    started = time.perf_counter()
    generations = store.read_generations()
    if "image_path" not in generations.columns:
        raise FileNotFoundError(f"the capture of variant {variant!r} recorded no images: labels are read off the "
                                f"top examples' images; capture with images saved")
    plan = plan_label_blocks(config.memory_budget_mib, generations.height, spec.width,
                             generations["prompt"].n_unique())
    say(f"feature labels {variant}: memory budget {plan.budget_mib} MiB: {plan.blocks} block(s) of "
        f"{plan.block_features} features over {generations.height} generations")
    out = Path(out_dir or feature_labels_dir(layout, variant))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-work{TEMP_MARKER}", dir=out.parent))
    try:
        prompts = generations.select(pl.col("generation_id").cast(pl.Int64), "prompt")
        blocks, wanted = best_prompt_blocks(store, variant, _top_peak_timesteps(stats_dir), prompts, spec.width,
                                            plan, work)
        kept = generations.filter(pl.col("generation_id").is_in(list(wanted)) & pl.col("image_path").is_not_null())
        ids, paths = kept["generation_id"].to_list(), kept["image_path"].to_list()
        del generations, prompts, kept
        if labeller is None:
            labeller = make_labeller(LabellerContext(name=name, config=project.labellers[name], project=project,
                                                     layout=layout, model=spec.model))
        encoded = encode_images(labeller, layout.data_root, paths)
        row_of = {int(g): i for i, g in enumerate(ids)}
        dataset = project.prompt_datasets[spec.prompts]
        labels, families = None, []
        if dataset.labels is not None:
            families = list(dataset.labels.families)
            labels = prompt_labels(file_inside(layout.prompts_dir(spec.prompts), dataset.file,
                                               f"prompt_datasets.{spec.prompts}.file"), dataset.labels,
                                   dataset.text_field)
        found = read_feature_concepts(feature_concepts_dir(layout, variant))
        concepts = None
        if found is not None:
            concepts = {int(c): (v or "") for c, v in found[0].select("channel", "concept").iter_rows()}
        values = concept_values(labels, families)
        parts = [label_block(pl.read_parquet(path), encoded, row_of, labeller, channels, config, labels=labels,
                             families=families, concepts=concepts, values=values, presorted=True)
                 for channels, path in blocks]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = with_q_values(pl.concat(parts), config.alpha)
    summary = {"variant": variant, "basis": spec.basis, "labeller": name, "labeller_kind": labeller.kind,
               "config": config.model_dump(mode="json"), "config_hash": config.config_hash(),
               "images": len(ids), "seconds": round(time.perf_counter() - started, 2),
               **summarise_labels(table, config)}
    out = write_feature_labels(out, table, summary)
    say(f"feature labels {variant}: {summary['scored']} of {spec.width} features labelled and scored "
        f"({summary['significant']} significant), {len(ids)} images, {summary['seconds']} s")
    return table, summary, out


def encode_images(labeller: Any, data_root: str | Path, paths: list[str]) -> np.ndarray:
    """``labeller.encode`` of the images ``paths`` (below ``data_root``), read and encoded
    :data:`IMAGES_PER_CHUNK` at a time: memory holds one chunk of images, not the capture's. A labeller without
    ``batch_size`` gets every image in one call (its own batching is unknown)."""
    from ddr_core.feature_concepts import load_images

    batch = getattr(labeller, "batch_size", None)
    if not isinstance(batch, int) or batch < 1 or len(paths) <= IMAGES_PER_CHUNK:
        return labeller.encode(load_images(data_root, paths))
    chunk = batch * max(1, IMAGES_PER_CHUNK // batch)
    return np.concatenate([labeller.encode(load_images(data_root, paths[start:start + chunk]))
                           for start in range(0, len(paths), chunk)])
