"""The feature-labels stage for one variant of the project configuration (:func:`feature_labels_for_variant`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import polars as pl

from ddr_core.labels.compute import (
    FeatureLabelsConfig,
    LogFn,
    label_features,
    summarise_labels,
    write_feature_labels,
)


def feature_labels_dir(layout: Any, variant: str) -> Path:
    return layout.stage_dir("feature_labels", variant)


def best_prompt_activations(store: Any, variant: str, stats_dir: Path) -> pl.DataFrame:
    """``channel, prompt, generation_id, activation``: per channel and prompt its best generation at the channel's
    top activity peak (the ranking of :mod:`ddr_core.feature_concepts`' top examples, every prompt kept)."""
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
    from ddr_core.feature_concepts import (
        feature_concepts_dir,
        load_images,
        prompt_labels,
        read_feature_concepts,
    )
    from ddr_core.labels.protocol import LabellerContext, make_labeller
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
    activations = best_prompt_activations(store, variant, stats_dir)
    generations = store.read_generations()
    if "image_path" not in generations.columns:
        raise FileNotFoundError(f"the capture of variant {variant!r} recorded no images: labels are read off the "
                                f"top examples' images; capture with images saved")
    wanted = set(activations["generation_id"].to_list())
    kept = generations.filter(pl.col("generation_id").is_in(list(wanted)) & pl.col("image_path").is_not_null())
    ids, paths = kept["generation_id"].to_list(), kept["image_path"].to_list()
    if labeller is None:
        labeller = make_labeller(LabellerContext(name=name, config=project.labellers[name], project=project,
                                                 layout=layout, model=spec.model))
    encoded = labeller.encode(load_images(layout.data_root, paths))
    row_of = {int(g): i for i, g in enumerate(ids)}
    dataset = project.prompt_datasets[spec.prompts]
    labels, families = None, []
    if dataset.labels is not None:
        families = list(dataset.labels.families)
        labels = prompt_labels(file_inside(layout.prompts_dir(spec.prompts), dataset.file,
                                           f"prompt_datasets.{spec.prompts}.file"), dataset.labels, dataset.text_field)
    found = read_feature_concepts(feature_concepts_dir(layout, variant))
    concepts = None
    if found is not None:
        concepts = {int(c): (v or "") for c, v in found[0].select("channel", "concept").iter_rows()}
    table = label_features(activations, encoded, row_of, labeller, range(spec.width), config, labels=labels,
                           families=families, concepts=concepts)
    summary = {"variant": variant, "basis": spec.basis, "labeller": name, "labeller_kind": labeller.kind,
               "config": config.model_dump(mode="json"), "config_hash": config.config_hash(),
               "images": len(ids), "seconds": round(time.perf_counter() - started, 2),
               **summarise_labels(table, config)}
    out = write_feature_labels(out_dir or feature_labels_dir(layout, variant), table, summary)
    say(f"feature labels {variant}: {summary['scored']} of {spec.width} features labelled and scored "
        f"({summary['significant']} significant), {len(ids)} images, {summary['seconds']} s")
    return table, summary, out
