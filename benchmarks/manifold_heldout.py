"""Held-out check of the sampler parameterisation (docs/DREAM_METHODS.md), declared before it ran.

Selective channels the demo did NOT dream (raw: those left; SAE: the next 16 by lowest q); today's latent dreams
(stage ``dreams``) and the sampler (``dreams_sampler``: 4 DDIM steps; the ``dreams_x0`` slot holds the sampler with
2 DDIM steps, a scratch use of the stage name) all from the same seeded noise (start: noise), the demo's recorded
dream config otherwise. DESTRUCTIVE on its data root (replaces dreams, removes priors and the feature_concepts
predictions so the benchmark classifies the new images): use a copy::

    cp -a <demo data root> /tmp/heldout
    DDR_DATA_ROOT=/tmp/heldout OMP_NUM_THREADS=1 .venv/bin/python benchmarks/manifold_heldout.py
"""
import json
import os
import shutil
import sys
import time

import polars as pl

from ddr_assets.visual_benchmark import classifier_of, random_baseline_of
from ddr_core.dreams import DreamConfig, dreams_for_variant
from ddr_core.feature_concepts import feature_concepts_dir, read_feature_concepts
from ddr_core.visual_benchmark import (
    METHODS,
    VisualBenchmarkConfig,
    benchmark_lines,
    compute_visual_benchmark,
)
from ddr_resources.resources import DdrStorage

if not os.environ.get("DDR_DATA_ROOT"):
    sys.exit("manifold_heldout.py rewrites its data root: set DDR_DATA_ROOT to a copy of a demo data root")
storage = DdrStorage()
project, layout = storage.project, storage.layout
tables = []
for variant in ("toy-raw", "toy-sae"):
    fc = feature_concepts_dir(layout, variant)
    table, summary = read_feature_concepts(fc)
    dreams_dir = layout.stage_dir("dreams", variant)
    done = sorted(int(p.name.split("_")[1]) for p in dreams_dir.glob("channel_*"))
    base = json.loads((dreams_dir / f"channel_{done[0]:05d}" / "dream.json").read_text())["config"]
    fams = summary["families"]
    sel = table.filter(pl.col("n_concepts") > 0).with_columns(
        pl.min_horizontal([pl.col(f"q_{f}") for f in fams]).alias("qmin")).sort("qmin")
    channels = [c for c in sel["channel"].to_list() if c not in done][:16]
    print(variant, "held-out channels", channels, flush=True)
    shutil.rmtree(dreams_dir)
    shutil.rmtree(layout.stage_dir("priors", variant))  # not compared here
    (fc / "dream_predictions.parquet").unlink()  # the new images are classified by the benchmark
    (fc / "prior_predictions.parquet").unlink()
    common = {**base, "start": "noise", "use_prior": False}
    for stage, extra in (("dreams", {}), ("dreams_sampler", {"parameterisation": "sampler", "sampler_steps": 4}),
                         ("dreams_x0", {"parameterisation": "sampler", "sampler_steps": 2})):
        t0 = time.monotonic()
        r = dreams_for_variant(project, layout, variant, channels, DreamConfig(**{**common, **extra}), "cpu", stage=stage)
        print(variant, stage, extra, len(r.channels_done), "channels", r.elements, "dreams",
              f"{time.monotonic() - t0:.0f}s", flush=True)
    bench = VisualBenchmarkConfig()
    found = compute_visual_benchmark(
        variant, layout.data_root, fc, {m.stage: layout.stage_dir(m.stage, variant) for m in METHODS},
        layout.stage_dir("visual_benchmark", variant), bench, log=print,
        random_baseline=random_baseline_of(storage, variant, bench), classify=classifier_of(storage, variant))
    tables.append(found.table)
for line in benchmark_lines(pl.concat(tables)):
    print(line)
