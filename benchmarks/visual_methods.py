"""New visualisation methods on a finished toy-world demo, scored by the visualisation benchmark.

For each labelled variant of a finished ``make demo`` data root (priors, dreams, timestep statistics and
``feature_concepts`` present), re-dreams the channels its ``dreams`` stage dreamed, with the *same* recorded
dream config except one setting, into their own stage folders, then scores every method with
:func:`ddr_core.visual_benchmark.compute_visual_benchmark` (one row group per method):

- ``dreams_example``: ``start: example`` (start from the channel's top dataset examples, regenerated from the
  capture's recorded seeds; feature accentuation, Hamblin et al. 2024);
- ``dreams_pre_activation`` (SAE variants only; for raw channels it is the same objective):
  ``objective: pre_activation``;
- ``dreams_x0``: ``parameterisation: x0_prediction`` (the picture is the denoiser's x0-prediction, re-noised to t);
- ``dreams_sampler``: ``parameterisation: sampler`` and ``start: noise`` (the initial noise optimised through
  ``sampler_steps`` DDIM steps down to t, gradient checkpointing);
- ``dreams_maco``: ``parameterisation: maco`` (phase only, amplitude spectrum of the model's own samples).

``--channels N`` keeps the first N dreamed channels (all methods, same channels); ``--num-steps`` overrides the
optimisation steps of the new methods (the recorded config's otherwise), ``--set KEY=JSON`` any other setting.

Writes into the data root (use a copy)::

    cp -a /tmp/demo-s5 /tmp/accent-demo
    DDR_DATA_ROOT=/tmp/accent-demo OMP_NUM_THREADS=1 .venv/bin/python benchmarks/visual_methods.py
"""

from __future__ import annotations

import argparse
import json
import time

from ddr_assets.visual_benchmark import classifier_of, generation_images_of, random_baseline_of
from ddr_core.dreams import DreamConfig, dreams_for_variant
from ddr_core.feature_concepts import feature_concepts_dir
from ddr_core.visual_benchmark import (
    METHODS,
    VisualBenchmarkConfig,
    benchmark_lines,
    compute_visual_benchmark,
)
from ddr_resources.resources import DdrStorage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["toy-raw", "toy-sae"])
    parser.add_argument("--methods", nargs="*", default=["dreams_example", "dreams_pre_activation"])
    parser.add_argument("--skip-dreams", action="store_true", help="only score what is there")
    parser.add_argument("--channels", type=int, default=0, help="first N dreamed channels only (0: all)")
    parser.add_argument("--num-steps", type=int, default=0, help="optimisation steps (0: the recorded config's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="further DreamConfig settings of the new methods, e.g. learning_rate=0.2 (validated)")
    args = parser.parse_args()
    storage = DdrStorage()
    project, layout = storage.project, storage.layout
    tables = []
    for variant in args.variants:
        dreams_dir = layout.stage_dir("dreams", variant)
        channels = sorted(int(p.name.split("_")[1]) for p in dreams_dir.glob("channel_*"))
        if args.channels:
            channels = channels[:args.channels]
        record = json.loads((dreams_dir / f"channel_{channels[0]:05d}" / "dream.json").read_text())
        base = record["config"]
        changes: dict[str, dict] = {
            "dreams_example": {"start": "example"}, "dreams_pre_activation": {"objective": "pre_activation"},
            "dreams_x0": {"parameterisation": "x0_prediction"}, "dreams_maco": {"parameterisation": "maco"},
            "dreams_sampler": {"parameterisation": "sampler", "start": "noise", "use_prior": False}}
        extra = {"num_steps": args.num_steps} if args.num_steps else {}
        for item in args.set:
            key, _, value = item.partition("=")
            extra[key] = json.loads(value)
        changes = {k: {**v, **extra} for k, v in changes.items()}
        for method in args.methods:
            if args.skip_dreams or (method == "dreams_pre_activation" and project.variants[variant].basis == "raw"):
                continue
            config = DreamConfig(**{**base, **changes[method]})
            start = time.monotonic()
            result = dreams_for_variant(project, layout, variant, channels, config, "cpu", stage=method)
            print(f"{variant} {method}: {len(result.channels_done)} channels, {result.elements} dreams, "
                  f"{time.monotonic() - start:.0f}s; settings {changes[method]} on {base}", flush=True)
        bench = VisualBenchmarkConfig()
        found = compute_visual_benchmark(
            variant, layout.data_root, feature_concepts_dir(layout, variant),
            {m.stage: layout.stage_dir(m.stage, variant) for m in METHODS},
            layout.stage_dir("visual_benchmark", variant), bench, log=print,
            random_baseline=random_baseline_of(storage, variant, bench), classify=classifier_of(storage, variant),
            generation_images=generation_images_of(storage, variant))
        tables.append(found.table)
    import polars as pl

    for line in benchmark_lines(pl.concat(tables)):
        print(line)


if __name__ == "__main__":
    main()
