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
- ``gain_over_unsteered`` / ``raised_over_unsteered_share`` / ``channels_gaining`` (rows of the same table): each
  prior's final latent against the **unsteered** empty-prompt generation of the same seed, both measured by
  :func:`ddr_core.dreams.measure_activations` at the channel's top activity peak over ``--noise-draws``
  schedule-noise draws shared by the pair (:mod:`ddr_core.prior_gain`, the one home of the measurement: the
  priors stage records it in ``prior.json``; priors made before it get it here,
  :func:`ddr_core.prior_gain.record_prior_gain_for_variant`). Interval: bootstrap over channels; p: sign flips of
  the channels' mean gains; channels gaining: k of n with a mean gain above 0.

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

from ddr_assets.visual_benchmark import classifier_of
from ddr_core.visual_benchmark import (
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


def main() -> None:
    from ddr_core.feature_concepts import feature_concepts_dir
    from ddr_core.prior_gain import record_prior_gain_for_variant
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
            result = priors_for_variant(project, layout, variant, channels,
                                        PriorsConfig(**base, **option, gain_noise_draws=args.noise_draws), "cpu",
                                        stage=method)
            print(f"{variant} {method}: {result.counts()} in {time.monotonic() - start:.0f}s; {option} on {base}",
                  flush=True)
        for method in PRIOR_METHODS:  # priors made before the gain was recorded (the demo's own, --skip-priors)
            if layout.stage_dir(method, variant).is_dir():
                measured = record_prior_gain_for_variant(project, layout, variant, method, channels, args.noise_draws)
                print(f"{variant} {method}: gain over the unsteered generation measured for {len(measured)} "
                      "channel(s) that lacked it", flush=True)
        found = compute_visual_benchmark(
            variant, layout.data_root, feature_concepts_dir(layout, variant),
            {m.stage: layout.stage_dir(m.stage, variant) for m in METHODS if m.stage in PRIOR_METHODS},
            layout.stage_dir("visual_benchmark_priors", variant), bench, log=print,
            classify=classifier_of(storage, variant))
        tables.append(found.table)
    table = pl.concat(tables)
    for line in benchmark_lines(table):
        print(line)


if __name__ == "__main__":
    main()
