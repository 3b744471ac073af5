"""Issue 14's steering options of the priors stage on a finished toy-world demo, scored side by side with the default.

For each labelled variant of a finished ``make demo`` data root, re-runs the priors of the channels its ``priors``
stage did, with the demo's recorded priors settings (seeds, steps, scale, timesteps mode, size) and one option
changed, each into its own stage folder (:mod:`ddr_core.priors`):

- ``priors_self_top``: ``steer_positions: self_top``, ``position_fraction: 0.25`` (only the quarter of the latent
  positions where the channel itself fires most in the current unsteered activation is pushed);
- ``priors_profile``: ``strength_shape: activity_profile`` (strength ``scale x max activation x profile(t) /
  peak profile`` instead of the nearly flat ``scale x max_activation(t)``).

These settings were fixed before any agreement was looked at (no tuning). Then:

- the visualisation benchmark (:func:`ddr_core.visual_benchmark.compute_visual_benchmark`) scores ``priors``,
  ``priors_self_top`` and ``priors_profile`` (agreement with the channels' significant concepts with its per-image
  chance, permutation p and bootstrap interval; recognisability; seed diversity; coverage) into
  ``outputs/<experiment>/visual_benchmark_priors/<variant>``;
- ``activation_gain``: each prior's final latent against the **unsteered** empty-prompt generation of the same seed,
  both measured by :func:`ddr_core.dreams.measure_activations` (the dream quality measure) at the channel's top
  activity peak, averaged over ``--noise-draws`` schedule-noise draws shared by the pair; gain = steered minus
  unsteered. Interval: bootstrap over channels; p: sign flips of the channels' mean gains.
  ``gain_positive_channels``: channels whose mean gain is above 0 (of n).

Held-out check (``--held-out N``): the first ``N`` selective channels (a ``feature_concepts`` verdict) the demo's
priors did **not** run, with the default priors generated for them too (``priors``, the demo's settings). Delete
``feature_concepts/<variant>/prior_predictions.parquet`` in that copy first, so every method's images are judged by
the same classifier call (:func:`ddr_assets.visual_benchmark.classifier_of`), and move the demo's priors aside (the
settings and the channels to leave out are read from ``--demo-stage``), so the ``priors`` row holds the held-out
channels only::

    cp -a /tmp/fresh15/data /tmp/steer-held && cd /tmp/steer-held/outputs/default
    rm feature_concepts/*/prior_predictions.parquet && mv priors priors_demo && cd -
    DDR_DATA_ROOT=/tmp/steer-held .venv/bin/python benchmarks/prior_steering.py --held-out 16 --demo-stage priors_demo

Writes into the data root (use a copy)::

    cp -a /tmp/fresh15/data /tmp/steer-demo
    DDR_DATA_ROOT=/tmp/steer-demo OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prior_steering.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch

from ddr_assets.visual_benchmark import classifier_of
from ddr_core.visual_benchmark import (
    BENCHMARK_SCHEMA,
    METHODS,
    VisualBenchmarkConfig,
    benchmark_lines,
    compute_visual_benchmark,
)

OPTIONS: dict[str, dict[str, Any]] = {
    "priors_self_top": {"steer_positions": "self_top", "position_fraction": 0.25},
    "priors_profile": {"strength_shape": "activity_profile"},
}
PRIOR_METHODS = ("priors", *OPTIONS)


def base_config(priors_dir: Path) -> dict[str, Any]:
    """The demo's priors settings, from the first finished ``prior.json``."""
    for path in sorted(priors_dir.glob("channel_*/prior.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "done":
            return {"n_results": len(record["seeds"]), "seeds": record["seeds"],
                    "timesteps": record["timesteps_mode"], "steer_strength_scale": record["steer_strength_scale"],
                    "num_inference_steps": record["num_inference_steps"], "height": record["height"],
                    "width": record["width"]}
    raise FileNotFoundError(f"no finished prior in {priors_dir}: run make demo first")


def gain_rows(storage: Any, variant: str, channels: list[int], base: dict[str, Any], noise_draws: int,
              bench: VisualBenchmarkConfig) -> list[dict[str, Any]]:
    """``activation_gain`` / ``gain_positive_channels`` of each prior method (see the module docstring)."""
    from safetensors.torch import load_file

    from ddr_core.benchmark_stats import cluster_bootstrap, sign_flip_test
    from ddr_core.dreams import DreamObjective, measure_activations
    from ddr_core.priors import generate_priors
    from ddr_core.random_baseline import derived_seed
    from ddr_core.steering import top_peaks
    from ddr_core.variant_inputs import load_variant_model

    project, layout = storage.project, storage.layout
    out_dir = layout.stage_dir("visual_benchmark_priors", variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, basis = load_variant_model(project, layout, variant, out_dir, "benchmark folder", "cpu", "float32")
    layer_name = project.layer_of(variant)
    seeds = list(base["seeds"])
    unsteered, _ = generate_priors(model, layer_name, basis.directions(channels[:1]),
                                   torch.zeros(1, model.num_train_timesteps), seeds,
                                   num_inference_steps=base["num_inference_steps"], batch_size=len(seeds),
                                   height=base["height"], width=base["width"])
    peaks = top_peaks(layout.timestep_stats_dir(variant), channels)
    rows = []
    for method in PRIOR_METHODS:
        stage_dir = layout.stage_dir(method, variant)
        gains: list[float] = []
        owners: list[int] = []
        per_channel: list[float] = []
        for channel in channels:
            path = stage_dir / f"channel_{channel:05d}" / "latents.safetensors"
            if channel not in peaks or not path.is_file():
                continue
            steered = load_file(str(path))["latents"]
            latents = torch.cat([steered, unsteered[0]])
            n = len(seeds)
            generators = [[torch.Generator().manual_seed(derived_seed(draw, index % n)) for index in range(2 * n)]
                          for draw in range(noise_draws)]
            values = measure_activations(model, layer_name, DreamObjective(torch.full((2 * n,), channel), basis),
                                         latents, torch.full((2 * n,), peaks[channel]), generators)
            diff = (values[:n] - values[n:]).tolist()
            gains += diff
            owners += [channel] * n
            per_channel.append(sum(diff) / n)
        if not gains:
            continue
        settings = json.dumps({"method": method, **OPTIONS.get(method, {})}, sort_keys=True)
        common = {"variant": variant, "method": method, "chance": 0.0, "settings": settings}
        rows.append({**common, "metric": "activation_gain", "value": sum(gains) / len(gains),
                     **dict(zip(("low", "high"), cluster_bootstrap(gains, owners, level=bench.level,
                                                                    resamples=bench.bootstrap_resamples,
                                                                    seed=bench.seed), strict=True)),
                     "p_value": sign_flip_test(per_channel, permutations=bench.permutations, seed=bench.seed),
                     "n": len(gains), "null": "0; p: signs of the channels' mean gains flipped",
                     "note": f"prior minus the unsteered generation of the same seed, measured at the channel's top "
                             f"peak over {noise_draws} shared schedule-noise draws"})
        rows.append({**common, "metric": "gain_positive_channels", "value": float(sum(g > 0 for g in per_channel)),
                     "low": None, "high": None, "p_value": None, "n": len(per_channel), "chance": None,
                     "null": "", "note": "count (not a share) of channels whose mean gain is above 0"})
    return rows


def main() -> None:
    from ddr_core.feature_concepts import feature_concepts_dir
    from ddr_core.priors import PriorsConfig, priors_for_variant
    from ddr_resources.resources import DdrStorage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["toy-raw", "toy-sae"])
    parser.add_argument("--noise-draws", type=int, default=4, help="schedule-noise draws of the gain measure")
    parser.add_argument("--skip-priors", action="store_true", help="only score what is there")
    parser.add_argument("--held-out", type=int, default=0,
                        help="N > 0: the first N selective channels without a demo prior, default priors included")
    parser.add_argument("--demo-stage", default="priors", help="stage folder of the demo's priors (settings, channels)")
    args = parser.parse_args()
    storage = DdrStorage()
    project, layout = storage.project, storage.layout
    bench = VisualBenchmarkConfig()
    tables = []
    for variant in args.variants:
        priors_dir = layout.stage_dir(args.demo_stage, variant)
        channels = sorted(int(p.name.split("_")[1]) for p in priors_dir.glob("channel_*"))
        base = base_config(priors_dir)
        options = dict(OPTIONS)
        if args.held_out:
            from ddr_core.feature_concepts import read_feature_concepts

            found_concepts = read_feature_concepts(feature_concepts_dir(layout, variant))
            if found_concepts is None:
                raise FileNotFoundError(f"no feature_concepts for {variant}: materialize it first")
            selective = sorted(int(c) for c in found_concepts[0].filter(pl.col("n_concepts") > 0)["channel"])
            channels = [c for c in selective if c not in set(channels)][:args.held_out]
            options = {"priors": {}, **OPTIONS}
            print(f"{variant}: held-out channels {channels}", flush=True)
        for method, option in options.items():
            if args.skip_priors:
                continue
            start = time.monotonic()
            result = priors_for_variant(project, layout, variant, channels, PriorsConfig(**base, **option), "cpu",
                                        stage=method)
            print(f"{variant} {method}: {result.counts()} in {time.monotonic() - start:.0f}s; {option} on {base}",
                  flush=True)
        found = compute_visual_benchmark(
            variant, layout.data_root, feature_concepts_dir(layout, variant),
            {m.stage: layout.stage_dir(m.stage, variant) for m in METHODS if m.stage in PRIOR_METHODS},
            layout.stage_dir("visual_benchmark_priors", variant), bench, log=print,
            classify=classifier_of(storage, variant))
        gains = pl.DataFrame(gain_rows(storage, variant, channels, base, args.noise_draws, bench),
                             schema=BENCHMARK_SCHEMA, orient="row")
        gains.write_parquet(layout.stage_dir("visual_benchmark_priors", variant) / "activation_gain.parquet")
        tables += [found.table, gains]
    table = pl.concat(tables)
    for line in benchmark_lines(table):
        print(line)


if __name__ == "__main__":
    main()
