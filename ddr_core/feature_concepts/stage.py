"""The feature-concepts stage for one variant of the project configuration (:func:`feature_concepts_for_variant`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddr_core.feature_concepts.compute import FeatureConceptsResult, compute_feature_concepts
from ddr_core.feature_concepts.config import FeatureConceptsConfig, LogFn
from ddr_core.feature_concepts.images import load_images
from ddr_core.feature_concepts.labels import prompt_labels


def feature_concepts_dir(layout: Any, variant: str) -> Path:
    return layout.stage_dir("feature_concepts", variant)


def feature_concepts_for_variant(project: Any, layout: Any, variant: str,
                                 config: FeatureConceptsConfig | None = None,
                                 log: LogFn | None = None, out_dir: str | Path | None = None) -> FeatureConceptsResult:
    """Score one variant of the project config from its timestep statistics, priors and dreams.

    Reads the prompt dataset's labels (``prompt_datasets.<p>.labels``), the capture's generations (for
    the chance purity), and, when the model declares a ``concept_classifier``, classifies the images
    of ``priors/<variant>`` and ``dreams/<variant>``; when it declares a ``world``, measures how close those
images (and the capture's generations, as the reference) come to the world's renders. Writes
``feature_concepts/<variant>/`` (or ``out_dir``).

    Raises:
        ValueError: the variant's prompt dataset has no labels (names the config field to add).
        FileNotFoundError: the timestep statistics or the classifier are missing (names what to run).
    """
    from ddr_core.activation_store import ActivationStore
    from ddr_core.paths import file_inside
    from ddr_core.statistics import require_statistics

    if variant not in project.variants:
        raise KeyError(f"unknown variant {variant!r}; declared: {sorted(project.variants)}")
    spec = project.variants[variant]
    dataset = project.prompt_datasets[spec.prompts]
    if dataset.labels is None:
        raise ValueError(f"variant {variant!r}: prompt dataset {spec.prompts!r} declares no concept labels; add "
                         f"`labels: {{families: [...]}}` under prompt_datasets.{spec.prompts} in the project config")
    stats_dir = layout.timestep_stats_dir(variant)
    require_statistics(stats_dir, variant)  # before loading a model
    layout.check_output_folder(feature_concepts_dir(layout, variant), "feature_concepts folder")  # no link
    labels = prompt_labels(file_inside(layout.prompts_dir(spec.prompts), dataset.file,
                                       f"prompt_datasets.{spec.prompts}.file"), dataset.labels, dataset.text_field)
    store = ActivationStore(layout.activations_dir(project.capture_of(variant)))
    generations = store.read_generations() if store.root.is_dir() else None
    pool = generations.select("prompt") if generations is not None else None
    classifier = None
    model = project.models[spec.model]
    world_renders, generation_images = None, None
    if model.world is not None:
        import functools

        from ddr_core.toy_world import MODEL_WORLDS, ToyWorldConfig, reference_renders

        toy_world = MODEL_WORLDS[model.world]
        world_renders = functools.lru_cache(maxsize=4)(
            lambda side: reference_renders(config=ToyWorldConfig(image_size=side, world=toy_world)))
        if generations is not None and "image_path" in generations.columns:
            paths = [p for p in generations["image_path"].to_list() if p]
            generation_images = load_images(layout.data_root, paths) if paths else None
    if model.concept_classifier:
        from ddr_core.concept_classifier import model_concept_classifier

        classifier = model_concept_classifier(project, layout, spec.model)
    elif log:
        log(f"model {spec.model!r} declares no concept_classifier: prior / dream agreement is skipped")
    if generations is None and (config or FeatureConceptsConfig()).examples == "peak_all_generations":
        raise FileNotFoundError(f"the capture of variant {variant!r} ({store.root}) is missing: its generations are "
                                f"ranked for the top examples; materialize activations[{project.capture_of(variant)}] "
                                f"first (or score the recorded examples: examples='top_peak')")
    return compute_feature_concepts(
        stats_dir, labels, dataset.labels.families, out_dir or feature_concepts_dir(layout, variant), variant=variant,
        basis=spec.basis, config=config, data_root=layout.data_root,
        priors_dir=layout.stage_dir("priors", variant), dreams_dir=layout.stage_dir("dreams", variant),
        classifier=classifier, generation_pool=pool if pool is not None and pool.height else None,
        world_renders=world_renders, generation_images=generation_images,
        store=store if generations is not None else None, log=log)
