"""``make demo``: materialize the main graph on the embedded default variants.

Runs every stage, partition by partition, in one persistent Dagster instance (``DAGSTER_HOME``), so
that ``dagster dev`` afterwards shows the materializations, their metadata and lineage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import dagster as dg

from ddr_assets.partitions import block_key, parse_block_key, project
from ddr_core.cfg_truth import cfg_truth_lines
from ddr_core.dose_response_view import dose_response_lines
from ddr_core.labels_view import feature_label_lines
from ddr_core.matching_view import matching_lines
from ddr_resources.resources import ComputeResource, DdrStorage

# Run config of the demo: a fixed seed so two demos give the same pictures.
# Lighter than the stage defaults so the whole demo stays within minutes on a laptop CPU.
DEMO_RUN_CONFIG: dict[str, dict] = {
    "activations": {"seed": 0, "batch_size": 8},
    "priors": {"num_inference_steps": 25},
    "dreams": {"batch_size": 64, "num_steps": 40, "n_results": 2, "timesteps": ["activity_peaks"]},
    "heatmaps": {"examples_per_channel": 4},
}
# Per model, on top of DEMO_RUN_CONFIG: the toy world's model was trained for guidance ~3 and samples
# well in 25 steps; its 36 prompts get 5 images each (180 generations, as its SAE was trained on).
DEMO_MODEL_RUN_CONFIG: dict[str, dict[str, dict]] = {
    "toy-world": {"activations": {"num_images_per_prompt": 5, "guidance_scale": 3.0, "num_inference_steps": 25,
                                  "batch_size": 36}},
    # the model trained without yellow (docs/MATCHING.md): captured exactly as toy-world, so the two match
    "toy-world-no-yellow": {"activations": {"num_images_per_prompt": 5, "guidance_scale": 3.0,
                                            "num_inference_steps": 25, "batch_size": 36}},
    # the richer world (docs/TOY_WORLD.md): its 576 prompts once each, the capture its design fixed
    "toy-world-rich": {"activations": {"num_images_per_prompt": 1, "guidance_scale": 3.0, "num_inference_steps": 25,
                                       "batch_size": 64}},
}
# Plots run on the first channel block of each variant (every block: --all-blocks). Priors, dreams and dose_response run on
# DEMO_CHANNELS channels per variant: for a variant with ground truth, the channels significantly selective for
# a concept (scored first, BH q < alpha) with the lowest q; otherwise the first channels (every channel of every
# block: --all-blocks).
DEMO_BLOCKS = 1
DEMO_CHANNELS = 16
# Heatmaps (where a channel fires) of the first DEMO_HEATMAP_CHANNELS of those channels per variant (every channel
# of every block: --all-blocks).
DEMO_HEATMAP_CHANNELS = 4


def demo_plan(variants: list[str], all_blocks: bool = False) -> list[tuple[str, list[str]]]:
    """(asset name, partition keys) in dependency order for the given variants."""
    cfg = project()
    models = sorted({cfg.variants[v].model for v in variants})
    saes = sorted({cfg.variants[v].sae for v in variants if cfg.variants[v].sae})
    prompts = sorted({cfg.variants[v].prompts for v in variants})
    captures = list(dict.fromkeys(cfg.capture_of(v) for v in variants))
    blocks = [block_key(v, first, last) for v in variants for first, last in cfg.variants[v].channel_blocks()]
    few = [block_key(v, first, last) for v in variants
           for first, last in cfg.variants[v].channel_blocks()[: None if all_blocks else DEMO_BLOCKS]]
    return [
        ("models", models),
        ("saes", saes),
        ("prompt_datasets", prompts),
        ("activations", captures),
        ("timestep_stats", list(variants)),
        ("cfg_contrast", list(variants)),
        ("activity_plots", few),
        ("priors", few),
        ("dreams", few),
        ("heatmaps", few),
        ("representation_shards", blocks),
        ("feature_concepts", [v for v in variants if v in cfg.labelled_variants()]),
        ("visual_benchmark", [v for v in variants if v in cfg.labelled_variants()]),
        ("feature_labels", [v for v in variants if v in cfg.labeller_variants()]),  # after feature_concepts: checked
        ("dose_response", few),  # after feature_concepts: it measures the concepts' probabilities
        ("feature_matches", demo_comparisons(variants)),  # seconds; docs/MATCHING.md
        ("html_export", list(variants)),  # after feature_concepts: the report shows the ground truth
    ]


def demo_comparisons(variants: list[str]) -> list[str]:
    """The configured comparisons (``feature_matches`` partitions) whose two variants are both in ``variants``."""
    from ddr_core.comparisons import parse_comparison_name

    return [name for name in project().comparisons if set(parse_comparison_name(name)) <= set(variants)]


def comparison_plan(name: str) -> list[tuple[str, list[str]]]:
    """``--comparison``: only what comparison ``name`` needs: both variants' models, SAEs, prompts and captures,
    then ``feature_matches[name]`` (the two-model toy diff: ``make diff-toy``, docs/MATCHING.md).

    Raises:
        SystemExit: a comparison the active profile (DDR_PROFILE) does not offer, naming the fix.
    """
    from ddr_core.comparisons import parse_comparison_name

    cfg = project()
    if name not in cfg.comparisons:
        raise SystemExit(f"comparison {name!r} is not among the active profile's {sorted(cfg.comparisons)}: set "
                         "DDR_PROFILE to a profile holding both of its variants (e.g. DDR_PROFILE=toy-diff)")
    variants = list(parse_comparison_name(name))
    return [(asset, keys) for asset, keys in demo_plan(variants)
            if asset in ("models", "saes", "prompt_datasets", "activations")] + [("feature_matches", [name])]


def demo_blocks_of(variant: str, channels: list[int]) -> list[str]:
    """The channel blocks of ``variant`` that hold some of ``channels``."""
    return [block_key(variant, first, last) for first, last in project().variants[variant].channel_blocks()
            if any(first <= c <= last for c in channels)]


def visualised_channels(layout, variant: str) -> tuple[list[int], str]:
    """The channels the demo makes priors and dreams for, and why (see ``DEMO_CHANNELS``): for a variant with
    ground truth its purity verdicts are computed first (no pictures yet, into a temporary folder: the
    ``feature_concepts`` asset scores the pictures at the end)."""
    import tempfile

    from ddr_core.feature_concepts import FeatureConceptsConfig, feature_concepts_for_variant

    cfg = project()
    first, last = cfg.variants[variant].channel_blocks()[0]
    first_channels = list(range(first, min(last + 1, first + DEMO_CHANNELS)))
    if variant not in cfg.labelled_variants():
        return first_channels, "no ground truth: the first channels"
    with tempfile.TemporaryDirectory(prefix="ddr-demo-concepts-") as folder:
        result = feature_concepts_for_variant(cfg, layout, variant, FeatureConceptsConfig(priors=False, dreams=False),
                                              out_dir=Path(folder) / "scores")
    chosen, n_selective = most_selective_channels(result.table, result.summary.get("families", []), DEMO_CHANNELS)
    if not chosen:
        return first_channels, "no channel is selective for a concept: the first channels"
    return chosen, (f"the {len(chosen)} of its {n_selective} channels selective for a concept (BH q < "
                    f"{result.summary['config']['alpha']:g}) with the lowest q")


def most_selective_channels(table, families: list[str], limit: int) -> tuple[list[int], int]:
    """``(channels, n)``: of the ``n`` channels of a ``feature_concepts`` table with a verdict (``n_concepts`` >
    0), the ``limit`` with the lowest q-value of any family (ties: the lower channel), in channel order."""
    selective = [(min(row[f"q_{f}"] for f in families if row.get(f"q_{f}") is not None), row["channel"])
                 for row in table.iter_rows(named=True) if row.get("n_concepts")]
    return sorted(channel for _, channel in sorted(selective)[:limit]), len(selective)


def _model_of(asset_name: str, key: str) -> str | None:
    """The model a partition of ``asset_name`` belongs to (None for provisioning assets)."""
    cfg = project()
    if asset_name == "activations":
        return cfg.capture_spec(key)[0]
    variant = parse_block_key(key)[0] if ":" in key else key
    return cfg.variants[variant].model if variant in cfg.variants else None


def stage_definitions(storage: DdrStorage, compute: ComputeResource | None = None) -> dg.Definitions:
    """The project's assets and named jobs with the demo's resources (its runs execute in process)."""
    from dagster_project.jobs import JOBS
    from ddr_assets import ALL_ASSETS

    return dg.Definitions(assets=ALL_ASSETS, jobs=JOBS,
                          resources={"storage": storage, "compute": compute or ComputeResource()})


def run_stage(defs: dg.Definitions, asset_name: str, key: str, instance: dg.DagsterInstance,
              run_config: dict | None, experiment: str, log_level: str = "DEBUG") -> dg.ExecuteInProcessResult:
    """Materialize ``asset_name[key]`` as a run of its named job (``capture_activations``, ...) tagged
    ``ddr/stage``, ``ddr/variant``, ``ddr/block``, ``ddr/experiment`` (:mod:`dagster_project.run_tags`) and
    ``ddr/launched_by=demo``, so the UI's run list tells the demo's runs apart.

    ``log_level``: what the run prints to the console (Dagster's ``console`` logger); the run's event log in the
    instance (the UI's run page) keeps every event whatever the level."""
    from dagster_project.jobs import job_of_asset
    from dagster_project.run_tags import ddr_run_tags

    tags = {**ddr_run_tags([asset_name], key, experiment=experiment), "ddr/launched_by": "demo"}
    run_config = {**(run_config or {}), "loggers": {"console": {"config": {"log_level": log_level}}}}
    return defs.resolve_job_def(job_of_asset(asset_name)).execute_in_process(
        run_config=run_config, instance=instance, partition_key=key, asset_selection=[dg.AssetKey(asset_name)],
        tags=tags, raise_on_error=False)


def failed_check_notes(result: dg.ExecuteInProcessResult, width: int = 240) -> list[str]:
    """One short note per asset check of a stage's run that did not pass (``check <name> FAILED: <description>``,
    cut to ``width`` characters). A failing check does not fail its run, so the stage's "ok" alone would hide it."""
    notes = []
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        note = f"check {evaluation.check_name} FAILED" + (f": {evaluation.description}" if evaluation.description else "")
        notes.append(note if len(note) <= width else note[: width - 3] + "...")
    return notes


def stage_line(asset_name: str, key: str, result: dg.ExecuteInProcessResult, seconds: float) -> str:
    """The demo's console line of one stage run: ``ok`` / ``FAILED``, its time, and its failed asset checks."""
    status = "ok" if result.success else "FAILED"
    failed = [evaluation.check_name for evaluation in result.get_asset_check_evaluations() if not evaluation.passed]
    checks = f" (check failed: {', '.join(failed)})" if failed else ""
    return f"  {asset_name}[{key}]: {status} in {seconds:.1f}s{checks}"


def quiet_libraries() -> None:
    """No per-load progress bars from diffusers / transformers / huggingface_hub ("Loading pipeline components",
    "Loading weights": dozens of lines per stage in a log); ddr's own progress (:mod:`ddr_core.progress`) still
    draws a bar on a terminal and logs counts otherwise."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="*", default=None,
                        help="variants to run (default: the config's default_variants)")
    parser.add_argument("--all-blocks", action="store_true",
                        help="plots, priors and dreams for every channel block (default: the first of each variant)")
    parser.add_argument("--verbose", action="store_true",
                        help="print every Dagster event of every run (default: warnings and errors only; the "
                             "Dagster UI keeps the full event log either way)")
    parser.add_argument("--until", default=None, choices=[name for name, _ in demo_plan([], False)],
                        help="stop after this stage (e.g. timestep_stats: enough for purity; docs/TOY_WORLD.md)")
    parser.add_argument("--comparison", default=None,
                        help="only capture both variants of this comparison and match them (docs/MATCHING.md)")
    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    variants = args.variants or project().default_variants
    plan = demo_plan(variants, args.all_blocks)
    if args.comparison:
        from ddr_core.comparisons import parse_comparison_name

        plan = comparison_plan(args.comparison)
        variants = list(parse_comparison_name(args.comparison))
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    storage = DdrStorage()
    print(f"ddr demo: variants {variants}; data root {storage.layout.data_root}; "
          f"experiment {storage.layout.experiment}")
    start = time.monotonic()
    demo_defs = stage_definitions(storage)
    chosen: dict[str, list[int]] = {}
    failed_checks: list[str] = []
    for asset_name, keys in plan:
        if asset_name == "priors" and not args.all_blocks:  # the channels to show, once they are scored
            keys = []
            for variant in variants:
                chosen[variant], why = visualised_channels(storage.layout, variant)
                print(f"  priors and dreams of {variant}: {why}: {chosen[variant]}")
                keys += demo_blocks_of(variant, chosen[variant])
        if asset_name in ("dreams", "dose_response") and not args.all_blocks:
            keys = [key for variant in variants for key in demo_blocks_of(variant, chosen[variant])]
        if asset_name == "heatmaps" and not args.all_blocks:
            keys = [key for variant in variants
                    for key in demo_blocks_of(variant, chosen[variant][:DEMO_HEATMAP_CHANNELS])]
        for key in keys:
            t0 = time.monotonic()
            op_config = {**DEMO_RUN_CONFIG.get(asset_name, {}),
                         **DEMO_MODEL_RUN_CONFIG.get(_model_of(asset_name, key), {}).get(asset_name, {})}
            if asset_name in ("priors", "dreams", "dose_response") and not args.all_blocks:
                variant, first, last = parse_block_key(key)
                op_config["channels"] = [c for c in chosen[variant] if first <= c <= last]
            if asset_name == "heatmaps" and not args.all_blocks:
                variant, first, last = parse_block_key(key)
                op_config["channels"] = [c for c in chosen[variant][:DEMO_HEATMAP_CHANNELS] if first <= c <= last]
            run_config = {"ops": {asset_name: {"config": op_config}}} if op_config else None
            result = run_stage(demo_defs, asset_name, key, instance, run_config, storage.layout.experiment,
                               log_level="DEBUG" if args.verbose else "WARNING")
            print(stage_line(asset_name, key, result, time.monotonic() - t0))
            failed_checks += [f"{asset_name}[{key}] {note}" for note in failed_check_notes(result)]
            if not result.success:
                for event in result.all_events:
                    if event.is_failure and event.event_specific_data is not None:
                        print(getattr(event.event_specific_data, "error", event.message), file=sys.stderr)
                return 1
        if asset_name == args.until:
            print(f"ddr demo stopped after {asset_name} (--until) in {time.monotonic() - start:.0f}s.")
            return 0
    layout = storage.layout
    print(f"ddr demo finished in {time.monotonic() - start:.0f}s. Data under {layout.data_root}.")
    if failed_checks:  # the runs succeeded, but these checks did not pass: say so beside the figures
        print(f"Asset checks that failed ({len(failed_checks)}; the Dagster UI shows each with its metadata):")
        for note in failed_checks:
            print(f"  {note}")
    if args.comparison:  # only the diff ran: its lines, not the other stages' results of the data root
        for line in matching_lines(layout, variants):
            print(line)
        return 0
    for line in (ground_truth_lines(layout, variants) + visual_benchmark_lines(layout, variants)
                 + dose_response_lines(layout, variants) + matching_lines(layout, variants)):
        print(line)
    for line in heatmap_lines(layout, variants):
        print(line)
    for line in feature_label_lines(layout, variants):  # ddr_core/labels_view.py
        print(line)
    for line in cfg_truth_lines(project(), layout, variants):  # ddr_core/cfg_truth.py
        print(line)
    print("Look at the results:")
    print(f"  inspector : make inspect   (or: .venv/bin/ddr inspect --data-root {layout.data_root}"
          f" --experiment {layout.experiment}; open the http://127.0.0.1:8501/?token=... URL it prints)")
    for variant in variants:
        print(f"  HTML report of {variant}: {layout.stage_dir('html_export', variant) / 'index.html'}")
    print(f"  Dagster UI: make dev   (DAGSTER_HOME={Path(os.environ.get('DAGSTER_HOME', '.dagster_home')).resolve()};"
          f" then open the http://127.0.0.1:3000/?token=... URL it prints)")
    return 0


def heatmap_lines(layout, variants: list[str]) -> list[str]:
    """Per variant with heatmaps: the toy-world share of heat on the shape vs chance (ddr_core/heatmap_view.py)."""
    from ddr_core.heatmap_view import summary_text
    from ddr_core.heatmaps import STAGE, read_heatmaps

    lines = []
    for variant in variants:
        found = read_heatmaps(layout.stage_dir(STAGE, variant))
        text = summary_text(found[1]) if found else None
        if text:
            lines.append(f"  {variant}: {text}")
    return ["Where channels fire (heatmaps; BENCHMARKS.md):", *lines] if lines else []


def ground_truth_lines(layout, variants: list[str]) -> list[str]:
    """Per scored variant (``feature_concepts``): how many channels are significantly selective (BH q < alpha,
    labels permuted among prompts), purity vs its exact chance with an interval, and how often the priors /
    dreams show a selective channel's concept vs per-image chance, with the permutation p-value; then the
    same agreement over every channel (the unflattering figure)."""
    from ddr_core.feature_concepts import feature_concepts_dir, read_feature_concepts

    def share(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    def interval(values) -> str:
        return "" if not values or values[0] is None else f" [{values[0]:.2f}, {values[1]:.2f}]"

    def p_value(value) -> str:
        return "-" if value is None else (f"{value:.1g}" if value < 0.01 else f"{value:.2f}")

    def floor(value) -> str:  # the smallest p these pairs allow (concept_stats.target_arrangements), when it binds
        return "" if value is None or value <= 0.001 else f"; the smallest p these pairs allow: {value:.2g}"

    lines = []
    for variant in variants:
        found = read_feature_concepts(feature_concepts_dir(layout, variant))
        if found is None:
            continue
        summary = found[1]
        purity, significance = summary["purity"], summary.get("significance") or {}
        lines.append(f"  ground truth {variant}: {significance.get('selective_channels', 0)} of "
                     f"{significance.get('channels_scored', 0)} channels selective (BH q < "
                     f"{significance.get('alpha', 0.05):g})"
                     f"{interval(significance.get('share_interval'))}; purity {share(purity['overall']['mean'])}"
                     f"{interval(purity['overall'].get('interval'))} vs chance {share(purity['chance']['mean'])}, "
                     f"excess {share(purity['excess']['mean'])}{interval(purity['excess'].get('interval'))}")
        world = summary.get("world") or {}
        for source, label in (("prior", "priors"), ("dream", "dreams")):
            section = summary.get("agreement", {}).get(source)
            if not section:
                continue
            selective = section.get("selective") or {}
            recognisable = ((world.get("sources") or {}).get(source) or {}).get("recognisable")
            look = f"{share(recognisable)} recognisable; " if recognisable is not None else ""
            every = "; ".join(
                f"{family} {share((values.get('test') or {}).get('rate'))} (chance "
                f"{share((values.get('test') or {}).get('chance'))}, p {p_value((values.get('test') or {}).get('p_value'))})"
                for family, values in section["families"].items())
            lines.append(f"    {label}: {look}show the selective concept {share(selective.get('rate'))}"
                         f"{interval(selective.get('interval'))} of {selective.get('n_units', 0)} channel x family "
                         f"(chance {share(selective.get('chance'))}, p {p_value(selective.get('p_value'))}"
                         f"{floor(selective.get('p_floor'))}); all channels: {every}")
        if (world.get("generations") or {}).get("recognisable") is not None:
            lines.append(f"    generations {share(world['generations']['recognisable'])} recognisable")
    lines += basis_gap_lines(layout, variants)
    if lines:
        lines.insert(0, "Ground truth (feature_concepts; BENCHMARKS.md explains the figures; [95% bootstrap intervals]):")
    return lines


def visual_benchmark_lines(layout, variants: list[str]) -> list[str]:
    """Per scored variant and method (``visual_benchmark``): agreement with the selective concepts vs per-image
    chance (p), recognisability, the dreams' gain over their start and their no-ops, seed diversity and
    coverage of the selective channels."""
    import polars as pl

    from ddr_core.visual_benchmark import benchmark_lines, read_visual_benchmark

    tables = [found[0] for found in (read_visual_benchmark(layout.stage_dir("visual_benchmark", v)) for v in variants)
              if found is not None]
    if not tables:
        return []
    return ["Visualisation benchmark (visual_benchmark; BENCHMARKS.md; [95% bootstrap intervals over channels]):",
            *benchmark_lines(pl.concat(tables))]


def basis_gap_lines(layout, variants: list[str]) -> list[str]:
    """One line per (raw, SAE) pair of the same capture group among ``variants``: SAE minus raw purity,
    purity excess and selective share with their intervals (are SAE features purer?)."""
    from ddr_core.config import load_project_config
    from ddr_core.feature_concepts import basis_gap, feature_concepts_dir, read_feature_concepts

    try:
        project = load_project_config()
    except Exception:  # the demo's own config loaded before; a caller without one gets no gap line
        return []
    found = {v: read_feature_concepts(feature_concepts_dir(layout, v)) for v in variants if v in project.variants}
    lines = []
    for raw in [v for v in found if found[v] is not None and project.variants[v].basis == "raw"]:
        for sae in [v for v in found if found[v] is not None and project.variants[v].basis == "sae"
                    and project.capture_of(v) == project.capture_of(raw)]:
            gap = basis_gap(found[raw][0], found[sae][0])
            parts = [f"{name.replace('_', ' ')} {values['gap']:+.3f} [{values['interval'][0]:+.3f}, "
                     f"{values['interval'][1]:+.3f}]" for name, values in gap.items() if values["interval"][0] is not None]
            lines.append(f"  {sae} minus {raw}: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    sys.exit(main())
