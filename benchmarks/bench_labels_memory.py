"""Memory benchmark of ``feature_labels``: peak RSS flat in the variant's width (blocks of features).

Writes a SYNTHETIC capture with the store's own writer (``ActivationStore.write_batch``: dense safetensors per
batch; 5 images per prompt, 8 px PNGs whose colour is the prompt's), a timestep-statistics ``activity_peaks.parquet``
(each channel's peak at a random observed timestep) and a labelled prompt file, in a data root laid out like the
project's (variant ``toy-sae`` with its width set to the scale's). Each scale runs the real stage,
:func:`ddr_core.labels.feature_labels_for_variant`, in a fresh subprocess whose peak RSS (its own ``VmHWM``,
:mod:`child_rss`) is measured; the labeller is a stand-in (an image's one-hot colour: the labels are not the point).
The features labelled are the first ``width x scale`` of the store (the store is written once at full width: a
block reads only its own channels, so a wider store costs no memory).

With ``--in-memory-scales`` the same scales also run the in-memory path (every generation x feature row at once:
:func:`ddr_core.labels.stage.best_prompt_activations` + :func:`ddr_core.labels.label_features`, the stage before
streaming) for comparison, and the tables are compared (identical).

    .venv/bin/python benchmarks/bench_labels_memory.py                   # 2000 gen. x 20480 features, minutes
    .venv/bin/python benchmarks/bench_labels_memory.py --in-memory-scales 0.125 0.5
    .venv/bin/python benchmarks/bench_labels_memory.py --generations 100 --channels 64 --timesteps 3

Prints per scale the features, blocks, time and peak RSS, then the ratios against the smallest scale. Exits
non-zero if a scale exceeds ``--memory-budget-mib``, if the in-memory and streamed tables differ, or (with
``--check-ratios``) if the streamed peak RSS grows more than ``--max-memory-ratio`` between the scales that hold a
full block (several blocks: below one block's width a narrower run holds less).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_rss import PEAK_RSS_FUNCTION  # noqa: E402

MIB = 2**20
VARIANT = "toy-sae"
IMAGES_PER_PROMPT = 5
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("black", "white")


def prompt_values(prompt_index: int) -> dict[str, str]:
    colours = list(COLOURS)
    return {"colour": colours[prompt_index % 3], "shape": SHAPES[prompt_index // 3 % 3],
            "background": BACKGROUNDS[prompt_index // 9 % 2]}


def write_capture(data_root: Path, generations: int, timesteps: int, channels: int, batch: int,
                  images_per_prompt: int = IMAGES_PER_PROMPT, seed: int = 0) -> None:
    """The synthetic capture, statistics' peaks and prompt file of ``VARIANT`` under ``data_root``."""
    import polars as pl
    from PIL import Image

    from ddr_core.activation_store import ActivationStore, VariantBatch
    from ddr_core.config import load_project_config
    from ddr_core.paths import DataLayout

    project = load_project_config()
    layout = DataLayout(data_root, project.experiment)
    store = ActivationStore(layout.activations_dir(project.capture_of(VARIANT)))
    observed = [int(t) for t in np.linspace(981, 1, timesteps).round().astype(int)]
    rng = np.random.default_rng(seed)
    images = layout.activations_dir(project.capture_of(VARIANT)) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, generations, batch)):
        ids = np.arange(start, min(start + batch, generations))
        values = rng.random((len(ids), timesteps, channels), dtype=np.float32)
        values[values < 0.7] = 0.0  # sparse, like SAE features
        rows = []
        for g in ids:
            p = int(g) // images_per_prompt
            path = images / f"gen_{int(g):07d}.png"
            Image.fromarray(np.full((8, 8, 3), COLOURS[prompt_values(p)["colour"]], dtype=np.uint8)).save(path)
            rows.append({"generation_id": int(g), "prompt_index": p, "prompt": f"synthetic prompt {p}",
                         "image_index": int(g) % images_per_prompt, "seed": int(g),
                         "image_path": str(path.relative_to(data_root))})
        store.write_batch(index, rows, observed, {VARIANT: VariantBatch(values.astype(np.float16))}, summaries=False)
    store.finalize()
    stats = layout.timestep_stats_dir(VARIANT)
    stats.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"channel": pl.Series(range(channels), dtype=pl.Int32),
                  "peak_rank": pl.Series([0] * channels, dtype=pl.Int32),
                  "observed_timestep": pl.Series(rng.choice(observed, size=channels), dtype=pl.Int64)}
                 ).write_parquet(stats / "activity_peaks.parquet")
    (stats / "summary.json").write_text(json.dumps({"width": channels, "config_hash": "synthetic"}))
    dataset = project.prompt_datasets[project.variants[VARIANT].prompts]
    prompts = layout.prompts_dir(project.variants[VARIANT].prompts) / dataset.file
    prompts.parent.mkdir(parents=True, exist_ok=True)
    n_prompts = -(-generations // images_per_prompt)
    prompts.write_text("".join(json.dumps({"text": f"synthetic prompt {p}", **prompt_values(p)}) + "\n"
                               for p in range(n_prompts)))


CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    data_root, width, budget, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from ddr_core.config import load_project_config
    from ddr_core.labels import FeatureLabelsConfig, feature_labels_for_variant, label_features
    from ddr_core.labels.protocol import lift_choice
    from ddr_core.paths import DataLayout

    class ColourLabeller:
        kind, names, batch_size = "bench", ["red", "green", "blue"], 64
        def encode(self, images):
            centres = np.asarray([[220, 30, 30], [30, 200, 30], [30, 30, 220]], dtype=float)
            means = np.asarray([image.reshape(-1, 3).mean(axis=0) for image in images]).reshape(-1, 3)
            nearest = ((means[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
            return np.eye(3)[nearest]
        def label(self, encoded, rows):
            return lift_choice(encoded, rows, self.names)
        def detect(self, label, encoded, rows):
            return encoded[rows, self.names.index(label)] > 0.5

    project = load_project_config()
    project.variants[%(variant)r] = project.variants[%(variant)r].model_copy(update={"width": width})
    layout = DataLayout(data_root, project.experiment)
    config = FeatureLabelsConfig(bootstrap_resamples=100, permutations=100, memory_budget_mib=budget)
    out = data_root / f"labels_{mode}_{width}"
    said = []
    start = time.monotonic()
    if mode == "stream":
        table, summary, _ = feature_labels_for_variant(project, layout, %(variant)r, config, out_dir=out,
                                                       labeller=ColourLabeller(), log=said.append)
    else:  # the in-memory path: every generation x feature row at once
        import polars as pl
        from ddr_core.activation_store import ActivationStore
        from ddr_core.feature_concepts import load_images, prompt_labels
        from ddr_core.labels.stage import best_prompt_activations
        store = ActivationStore(layout.activations_dir(project.capture_of(%(variant)r)))
        stats = data_root / f"stats_{width}"  # the peaks of the first `width` channels only
        stats.mkdir(exist_ok=True)
        peaks = pl.read_parquet(layout.timestep_stats_dir(%(variant)r) / "activity_peaks.parquet")
        peaks.filter(pl.col("channel") < width).write_parquet(stats / "activity_peaks.parquet")
        activations = best_prompt_activations(store, %(variant)r, stats)
        generations = store.read_generations()
        kept = generations.filter(pl.col("generation_id").is_in(activations["generation_id"].unique().to_list()))
        labeller = ColourLabeller()
        encoded = labeller.encode(load_images(data_root, kept["image_path"].to_list()))
        row_of = {int(g): i for i, g in enumerate(kept["generation_id"].to_list())}
        spec = project.variants[%(variant)r]
        dataset = project.prompt_datasets[spec.prompts]
        labels = prompt_labels(layout.prompts_dir(spec.prompts) / dataset.file, dataset.labels, dataset.text_field)
        table = label_features(activations, encoded, row_of, labeller, range(width), config, labels=labels,
                               families=list(dataset.labels.families))
        out.mkdir(parents=True, exist_ok=True)
    seconds = time.monotonic() - start
    table.write_parquet(data_root / f"table_{mode}_{width}.parquet")
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss(), "said": said,
                      "scored": int(table["score"].is_not_null().sum())}))
""") % {"variant": VARIANT}
CHILD = CHILD.replace("from ddr_core.config import", PEAK_RSS_FUNCTION + "from ddr_core.config import", 1)
assert "def peak_rss" in CHILD


def run_child(data_root: Path, width: int, budget_mib: int, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", CHILD, str(data_root), str(width), str(budget_mib), mode],
                            cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"labels child ({mode}, width {width}) failed:\n{result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=2000, help="a slice of the thesis' 5,000 (per feature "
                        "the work is the same; the block shrinks with more generations)")
    parser.add_argument("--timesteps", type=int, default=4, help="the labels read one (the peak) per feature")
    parser.add_argument("--channels", type=int, default=20480, help="full width (thesis SAE: 20480)")
    parser.add_argument("--batch", type=int, default=50, help="generations per store batch")
    parser.add_argument("--images-per-prompt", type=int, default=IMAGES_PER_PROMPT,
                        help="1: every generation its own prompt, the most rows per block (the plan's worst case)")
    parser.add_argument("--memory-budget-mib", type=int, default=1024)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.5, 1.0])
    parser.add_argument("--in-memory-scales", type=float, nargs="*", default=[],
                        help="also run the in-memory path at these scales (its memory grows with the width)")
    parser.add_argument("--check-ratios", action="store_true", help="fail if the streamed peak RSS is not flat")
    parser.add_argument("--max-memory-ratio", type=float, default=1.15)
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the capture (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the capture and tables")
    args = parser.parse_args(argv)
    if args.generations < args.images_per_prompt * 4 or args.timesteps < 1 or args.channels < 8:
        parser.error("need --generations >= 4 x --images-per-prompt, --timesteps >= 1 and --channels >= 8")

    from ddr_core.labels.streaming import plan_label_blocks

    workdir = Path(tempfile.mkdtemp(prefix="ddr-bench-labels-", dir=args.workdir))
    failures: list[str] = []
    try:
        start = time.monotonic()
        write_capture(workdir, args.generations, args.timesteps, args.channels, args.batch,
                      args.images_per_prompt)
        print(f"synthetic capture {args.generations} generations x {args.timesteps} timesteps x {args.channels} "
              f"features written in {time.monotonic() - start:.0f} s; memory_budget_mib={args.memory_budget_mib}")
        rows = []
        for scale in sorted(set(args.scales) | set(args.in_memory_scales)):
            width = max(1, int(round(args.channels * scale)))
            plan = plan_label_blocks(args.memory_budget_mib, args.generations, width,
                                     -(-args.generations // args.images_per_prompt))
            for mode in ("stream", "memory"):
                if (mode == "stream" and scale not in args.scales) or (
                        mode == "memory" and scale not in args.in_memory_scales):
                    continue
                result = run_child(workdir, width, args.memory_budget_mib, mode)
                rows.append({"scale": scale, "width": width, "mode": mode, "blocks": plan.blocks,
                             "block": plan.block_features, **result})
                if mode == "stream" and result["peak_rss"] > args.memory_budget_mib * MIB:
                    failures.append(f"width {width}: peak RSS {result['peak_rss'] / MIB:.0f} MiB over the budget")
            if scale in args.scales and scale in args.in_memory_scales:
                import polars as pl

                streamed = pl.read_parquet(workdir / f"table_stream_{width}.parquet")
                in_memory = pl.read_parquet(workdir / f"table_memory_{width}.parquet")
                if not streamed.equals(in_memory):
                    failures.append(f"width {width}: the streamed table differs from the in-memory one")
                else:
                    print(f"width {width}: streamed table == in-memory table ({streamed.height} rows)")
        print(f"feature_labels peak RSS, {args.generations} generations "
              f"({-(-args.generations // args.images_per_prompt)} prompts), each run in a fresh process:")
        print(f"    {'path':>9} {'scale':>6} {'features':>8} {'blocks':>6} {'block':>6} {'seconds':>8} "
              f"{'ms/feature':>10} {'peak MiB':>9}")
        for row in rows:
            blocks = f"{row['blocks']:>6} {row['block']:>6}" if row["mode"] == "stream" else f"{'-':>6} {'-':>6}"
            path = "streamed" if row["mode"] == "stream" else "in-memory"
            print(f"    {path:>9} {row['scale']:>6.3f} {row['width']:>8} {blocks} {row['seconds']:>8.1f} "
                  f"{1000 * row['seconds'] / row['width']:>10.2f} {row['peak_rss'] / MIB:>9.0f}")
        for mode in ("stream", "memory"):
            mine = [row for row in rows if row["mode"] == mode]
            for row in mine[1:]:
                memory = row["peak_rss"] / mine[0]["peak_rss"]
                print(f"    {'streamed' if mode == 'stream' else 'in-memory'}: {row['width']} / {mine[0]['width']} "
                      f"features (x{row['width'] / mine[0]['width']:.0f}): peak RSS x{memory:.3f}, time "
                      f"x{row['seconds'] / mine[0]['seconds']:.2f}")
        # flat where every run holds a full block: from the first scale at least one block wide
        full = [row for row in rows if row["mode"] == "stream" and row["width"] >= row["block"] and row["blocks"] > 1]
        for row in full[1:]:
            memory = row["peak_rss"] / full[0]["peak_rss"]
            print(f"    streamed, full blocks: {row['width']} / {full[0]['width']} features: peak RSS x{memory:.3f}")
            if args.check_ratios and memory > args.max_memory_ratio:
                failures.append(f"streamed peak RSS grows x{memory:.3f} from {full[0]['width']} to {row['width']} "
                                f"features at the same block (allowed x{args.max_memory_ratio})")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
