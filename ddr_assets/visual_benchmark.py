"""``visual_benchmark``: methods x metrics of one labelled variant's visualisations (toy world ground truth).

Partitioned like ``feature_concepts`` (the variants whose prompts carry concept labels) and downstream of it:
it reads its verdicts and classifier predictions, the priors' and dreams' records and the dream quality
table, and runs no model. The work is :func:`ddr_core.visual_benchmark.compute_visual_benchmark`; the
metadata carries the table (Markdown, data escaped), the contact sheet and the coverage gaps.
"""

import dagster as dg
import polars as pl

from ddr_assets.activations import image_preview
from ddr_assets.configs import dagster_config_from, to_core
from ddr_assets.feature_concepts import labelled_variant_identity_mapping, labelled_variant_partitions
from ddr_assets.lineage import lineage_metadata, path_metadata, require_upstream, table_preview
from ddr_assets.partitions import block_keys, parse_block_key
from ddr_core.config import config_hash
from ddr_core.feature_concepts import feature_concepts_dir, markdown_table
from ddr_core.records import make_record, read_record, write_record
from ddr_core.visual_benchmark import (
    CONTACT_SHEET_FILE,
    METHODS,
    VisualBenchmarkConfig,
    benchmark_rows,
    compute_visual_benchmark,
)
from ddr_resources.resources import DdrStorage

VISUAL_BENCHMARK_CODE_VERSION = "1"
VisualBenchmarkRunConfig = dagster_config_from(VisualBenchmarkConfig, "VisualBenchmarkRunConfig")


def _upstream(records_dir, variant: str) -> dict[str, str]:
    """Data versions of what the benchmark reads: feature_concepts[variant] (required) and every block of its
    priors / dreams / dreams_no_noise that has a record."""
    upstream = {f"feature_concepts/{variant}": read_record(records_dir, "feature_concepts", variant,
                                                           required_by=f"visual_benchmark[{variant}]")["data_version"]}
    for key in (k for k in block_keys() if parse_block_key(k)[0] == variant):
        for method in METHODS:
            try:
                upstream[f"{method.stage}/{key}"] = read_record(records_dir, method.stage, key)["data_version"]
            except Exception:  # that block has no such output: nothing of it is read
                continue
    return upstream


def random_baseline_of(storage: DdrStorage, variant: str, config: VisualBenchmarkConfig):
    """The benchmark's random-latent baseline for ``variant``: loads the variant's model and basis on the CPU
    (once, on first use) and measures :func:`ddr_core.random_baseline.random_latent_activations` under a dream
    method's recorded settings (schedule noise on or off, its noise draws and seed)."""
    loaded: dict[str, object] = {}

    def measure(pairs, settings, size):
        from ddr_core.basis import load_basis
        from ddr_core.families import load_model
        from ddr_core.random_baseline import random_latent_activations

        project, layout = storage.project, storage.layout
        if not loaded:
            loaded["model"] = load_model(layout.model_dir(project.variants[variant].model), device="cpu")
            loaded["model"].read_layer_as(project.layer_of(variant), project.hook_of(variant))
            loaded["basis"] = load_basis(project, layout, variant, loaded["model"], "cpu")
        return random_latent_activations(
            loaded["model"], loaded["basis"], project.layer_of(variant), pairs, height=size[0], width=size[1],
            n_random=config.random_latents, noise_draws=int(settings.get("quality_noise_draws") or 4),
            schedule_noise=bool(settings.get("see_through_schedule_noise", True)),
            seed=int(settings.get("random_seed") or 0) + 1)

    return measure


def classifier_of(storage: DdrStorage, variant: str):
    """Classify and measure (world RMSE) the images of a method ``feature_concepts`` did not score
    (``dreams_no_noise``) as it does: the model's concept classifier (its provisioned files checked, no link out
    of the model folder) and, for the toy world, the distance to its renders. ``None`` without a classifier."""
    project, layout = storage.project, storage.layout
    spec = project.variants[variant]
    model = project.models[spec.model]
    if not model.concept_classifier:
        return None
    renders_of: dict = {}

    def classify(paths: list[str], families: list[str]) -> pl.DataFrame:
        from ddr_core.concept_classifier import model_concept_classifier
        from ddr_core.feature_concepts import classify_images, load_images

        classifier = model_concept_classifier(project, layout, spec.model)
        images = load_images(layout.data_root, paths)
        frame = pl.DataFrame({"image": paths, **classify_images(classifier, images, families)})
        if model.world is not None and images:
            import numpy as np

            from ddr_core.toy_world import (
                MODEL_WORLDS,
                ToyWorldConfig,
                nearest_render_rmse,
                reference_renders,
            )

            rmse = []
            for image in images:  # renders at each image's size (one size per method in practice: cached)
                renders = renders_of.get(image.shape[0])
                if renders is None:
                    renders = renders_of[image.shape[0]] = reference_renders(
                        config=ToyWorldConfig(image_size=image.shape[0], world=MODEL_WORLDS[model.world]))
                rmse.append(float(nearest_render_rmse(np.array(image[None]), renders)[0]))
            frame = frame.with_columns(pl.Series("world_rmse", np.asarray(rmse), dtype=pl.Float64))
        return frame

    return classify


def generation_images_of(storage: DdrStorage, variant: str) -> dict[int, str] | None:
    """Generation id -> data-root relative image of ``variant``'s capture (the start images of ``start:
    example`` dreams), or ``None`` without a finished generations table."""
    path = storage.layout.activations_dir(storage.project.capture_of(variant)) / "generations.parquet"
    if not path.is_file():
        return None
    table = pl.read_parquet(path, columns=["generation_id", "image_path"])
    return {int(g): str(p) for g, p in table.iter_rows() if p is not None}


@dg.asset(
    partitions_def=labelled_variant_partitions(),
    deps=[dg.AssetDep("feature_concepts", partition_mapping=labelled_variant_identity_mapping())],
    group_name="ground_truth",
    code_version=VISUAL_BENCHMARK_CODE_VERSION,
    kinds={"parquet"},
    description="Visualisation benchmark of a labelled variant: per method (priors, dreams, dreams without "
                "schedule noise) agreement with the selective channels' concepts (per-image chance, "
                "channel-permutation p), recognisability, activation gain over the start and the no-op dreams, "
                "diversity across seeds and coverage of the selective channels, with bootstrap intervals over "
                "channels; a contact sheet of the selective channels' images.",
)
def visual_benchmark(context: dg.AssetExecutionContext, config: VisualBenchmarkRunConfig,
                     storage: DdrStorage) -> dg.MaterializeResult:
    variant = context.partition_key
    core_config = to_core(config, VisualBenchmarkConfig, asset="visual_benchmark")
    layout = storage.layout
    require_upstream(storage, "visual_benchmark", variant)
    upstream = _upstream(layout.records_dir, variant)
    out_dir = layout.check_output_folder(layout.stage_dir("visual_benchmark", variant), "visual_benchmark folder")
    stage_dirs = {method.stage: layout.stage_dir(method.stage, variant) for method in METHODS}
    baseline = random_baseline_of(storage, variant, core_config) if core_config.random_latents else None
    result = compute_visual_benchmark(variant, layout.data_root, feature_concepts_dir(layout, variant), stage_dirs,
                                      out_dir, core_config, log=context.log.info, random_baseline=baseline,
                                      classify=classifier_of(storage, variant),
                                      generation_images=generation_images_of(storage, variant))
    data_version = config_hash({"config": core_config.config_hash(), "upstream": upstream,
                                "code": VISUAL_BENCHMARK_CODE_VERSION})
    run_config = core_config.model_dump(mode="json")
    write_record(layout.records_dir, make_record(
        "visual_benchmark", variant, VISUAL_BENCHMARK_CODE_VERSION, run_config, upstream, data_version,
        outputs={"dir": layout.relative(result.out_dir), "rows": result.table.height},
    ))
    missing = result.coverage.filter(~result.coverage["visualised"])
    return dg.MaterializeResult(
        metadata={
            "path": path_metadata(result.out_dir),
            "benchmark": dg.MetadataValue.md(markdown_table(benchmark_rows(result.table))),
            "contact_sheet": path_metadata(result.out_dir / CONTACT_SHEET_FILE),
            "contact_sheet_preview": image_preview([result.out_dir / CONTACT_SHEET_FILE], size=512),
            "methods": dg.MetadataValue.json(result.summary["methods"]),
            "selective_channels": int(result.summary["selective_channels"]),
            "channels_not_visualised": table_preview(missing.select("method", "channel", "concept", "reason")
                                                     .to_dicts(), limit=40),
            **lineage_metadata(run_config, upstream, VISUAL_BENCHMARK_CODE_VERSION),
        },
        data_version=dg.DataVersion(data_version),
    )
