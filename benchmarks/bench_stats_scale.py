"""Scale benchmark of ``timestep_stats``: memory flat and time linear in the number of generations.

Writes a SYNTHETIC activation store with ``ActivationStore.write_batch`` (the real store format: dense
safetensors per batch, capture-time top-k and max parts, generations, done markers), uniform background
values in ``[0, 1)`` and planted answers:

- planted channels ``c`` each own one timestep column ``t`` where they are 10 in every generation (so they
  are in the top-k of every generation there: count = G, frequency 1.0, the profile's highest peak exactly
  at that timestep with height 1.0);
- at that (channel, timestep) a few planted generations spread over the whole range get 100, 98, 96, ...:
  they are the first dataset examples in that order, then the lowest other generation ids (all tied at 10),
  and the maximum activation is 100.

The store is written once at full size; the 1/8 and 1/2 scales are stores made of its first finished
batches (hard links, then ``finalize``). Each scale runs ``compute_timestep_stats`` in a fresh subprocess
whose peak RSS (its own ``VmHWM``, :mod:`child_rss`) is measured, after a read-only pass over the dense files that measures the
store's read throughput (page cache as the write left it: warm when the store fits in free memory). Prints
per scale the time, peak RSS and throughput, then the ratios against the smallest scale; checks the planted answers at every scale and
(with ``--check-ratios``) memory flatness. Also prints the store's bytes per generation by part and the
extrapolation to the thesis' capture (SD v1.4: 1,280 raw + 20,480 SAE channels, 50 steps, both halves).

    .venv/bin/python benchmarks/bench_stats_scale.py                       # 5000 x 50 x 256, ~minutes
    .venv/bin/python benchmarks/bench_stats_scale.py --channels 20480      # full width: ~21 GB of disk
    .venv/bin/python benchmarks/bench_stats_scale.py --generations 64 --timesteps 6 --channels 32 --batch 8

Exits non-zero if a planted answer is wrong, if a scale exceeds ``--memory-budget-mib``, or (with
``--check-ratios``) if peak RSS grows more than ``--max-memory-ratio`` from the smallest to the full scale.
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
VARIANT = "sae"
PLANTED_BASE = 10.0  # value of a planted channel at its timestep in every generation
PLANTED_TOP = 100.0  # first planted example; the next ones 2 lower each (exact in float16)
THESIS = {"generations": 5000, "timesteps": 50, "raw": 1280, "sae": 20480}


def planted_channels(channels: int, timesteps: int, count: int = 4) -> list[tuple[int, int]]:
    """``[(channel, timestep column)]``: spread over the width, each its own interior column (a peak at the
    first or last observed timestep would be a plateau up to the profile's edge, its middle elsewhere)."""
    count = max(1, min(count, channels, timesteps - 2))
    return [(int(i * channels // count + channels // (2 * count)), 1 + int(i * (timesteps - 2) // count))
            for i in range(count)]


def planted_examples(generations: int, count: int = 5) -> list[int]:
    """Generation ids of the planted examples, best first, spread over ``0..generations-1``."""
    ids = [int(round(f * (generations - 1))) for f in (0.99, 0.01, 0.6, 0.3, 0.8)][:count]
    return list(dict.fromkeys(ids))


def write_store(root: Path, generations: int, timesteps: int, channels: int, batch: int, seed: int = 0,
                summaries: bool = True) -> dict:
    """Write the synthetic store with the store's own writer; return the planted answers."""
    from ddr_core.activation_store import ActivationStore, VariantBatch

    store = ActivationStore(root)
    observed = [int(t) for t in np.linspace(981, 1, timesteps).round().astype(int)]
    planted = planted_channels(channels, timesteps)
    examples = planted_examples(generations)
    rng = np.random.default_rng(seed)
    for index, start in enumerate(range(0, generations, batch)):
        ids = np.arange(start, min(start + batch, generations))
        values = rng.random((len(ids), timesteps, channels), dtype=np.float32)
        for channel, column in planted:
            values[:, column, channel] = PLANTED_BASE
            for rank, generation in enumerate(examples):
                if start <= generation < start + len(ids):
                    values[generation - start, column, channel] = PLANTED_TOP - 2 * rank
        rows = [{"generation_id": int(g), "prompt_index": int(g) // 5, "prompt": f"synthetic prompt {int(g) // 5}",
                 "image_index": int(g) % 5, "seed": int(g), "image_path": f"images/gen_{int(g):07d}.png"}
                for g in ids]
        store.write_batch(index, rows, observed, {VARIANT: VariantBatch(values.astype(np.float16))},
                          capture_top_k=min(64, channels), summaries=summaries)
    store.finalize()
    return {"planted": planted, "examples": examples, "timesteps": observed}


def subset_store(full: Path, target: Path, generations: int, batch: int) -> None:
    """A store of the first ``generations / batch`` finished batches of ``full`` (hard links + finalize)."""
    from ddr_core.activation_store import ActivationStore

    keep = {f"batch_{i:05d}" for i in range(-(-generations // batch))}
    for path in full.rglob("*"):
        if path.is_file() and (path.stem in keep or path.name == "timesteps.json"):
            destination = target / path.relative_to(full)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, destination)
    ActivationStore(target).finalize()


STATS_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from ddr_core.activation_store import ActivationStore
    from ddr_core.statistics import TimestepStatsConfig, compute_timestep_stats
    from ddr_core.stats_streaming import plan_memory
    root, out, variant, top_k, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    store = ActivationStore(root)
    config = TimestepStatsConfig(top_k=top_k, memory_budget_mib=budget)
    plan = plan_memory(budget, store.width(variant), len(store.timesteps()), config.resolved_n_examples)
    start = time.monotonic()
    values = dense_bytes = 0
    for index in sorted(store.finished_batches()):
        dense_bytes += store.dense_path(variant, index).stat().st_size
    for _ids, _t, chunk in store.iter_dense(variant, max_generations=plan.chunk_generations):
        values += chunk.size
    read_seconds = time.monotonic() - start
    start = time.monotonic()
    summary = compute_timestep_stats(store, variant, out, config)
    print(json.dumps({"seconds": time.monotonic() - start, "generations": summary.n_generations,
                      "read_seconds": read_seconds, "values": values, "dense_bytes": dense_bytes,
                      "chunk_generations": plan.chunk_generations,
                      "peak_rss": peak_rss()}))
""")
STATS_CHILD = STATS_CHILD.replace("store = ActivationStore(root)", PEAK_RSS_FUNCTION + "store = ActivationStore(root)", 1)
assert "def peak_rss" in STATS_CHILD


def run_stats(store: Path, out: Path, top_k: int, budget_mib: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", STATS_CHILD, str(store), str(out), VARIANT, str(top_k),
                             str(budget_mib)], cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"statistics child failed:\n{result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def check_planted(stats_dir: Path, answers: dict, generations: int, top_k: int) -> list[str]:
    """Compare the statistics of a ``generations``-sized store with the planted answers; return problems."""
    import polars as pl

    problems = []
    frequency = pl.read_parquet(stats_dir / "frequency.parquet")
    peaks = pl.read_parquet(stats_dir / "activity_peaks.parquet")
    examples = pl.read_parquet(stats_dir / "dataset_examples.parquet")
    maximum = pl.read_parquet(stats_dir / "max_activation.parquet")
    present = [g for g in answers["examples"] if g < generations]
    others = [g for g in range(generations) if g not in present][: max(0, top_k - len(present))]
    for channel, column in answers["planted"]:
        timestep = answers["timesteps"][column]
        row = frequency.filter((pl.col("channel") == channel) & (pl.col("timestep") == timestep))
        if row.height != 1 or row["count"][0] != generations or row["frequency"][0] != 1.0:
            problems.append(f"channel {channel} at {timestep}: frequency row {row.to_dicts()} != count {generations}")
        top = peaks.filter((pl.col("channel") == channel) & (pl.col("peak_rank") == 0))
        if top.height != 1 or top["timestep"][0] != timestep or top["height"][0] != 1.0:
            problems.append(f"channel {channel}: top peak {top.to_dicts()} != timestep {timestep}, height 1.0")
        got = examples.filter((pl.col("channel") == channel) & (pl.col("timestep") == timestep)).sort("rank")
        expected_ids = (present + others)[:top_k]
        expected_values = [PLANTED_TOP - 2 * answers["examples"].index(g) if g in present else PLANTED_BASE
                           for g in expected_ids]
        if got["generation_id"].to_list() != expected_ids or got["activation"].to_list() != expected_values:
            problems.append(f"channel {channel} at {timestep}: examples {got['generation_id'].to_list()} "
                            f"{got['activation'].to_list()} != {expected_ids} {expected_values}")
        best = maximum.filter((pl.col("channel") == channel) & (pl.col("timestep") == timestep))["max_activation"]
        expected_max = PLANTED_TOP - 2 * answers["examples"].index(present[0]) if present else PLANTED_BASE
        if best.to_list() != [expected_max]:
            problems.append(f"channel {channel} at {timestep}: max {best.to_list()} != {expected_max}")
    return problems


def store_parts(root: Path) -> dict[str, int]:
    """Bytes on disk by part of the store: dense, topk, max, generations, done, other."""
    parts: dict[str, int] = {}
    for path in root.rglob("*"):
        if path.is_file():
            relative = path.relative_to(root).parts
            name = relative[1] if len(relative) == 3 and relative[1] in ("batches", "topk", "max") else relative[0]
            name = {"batches": "dense"}.get(name, name)
            name = name if name in ("dense", "topk", "max", "generations", "done") else "other"
            parts[name] = parts.get(name, 0) + path.stat().st_size
    return parts


def storage_report(parts: dict[str, int], generations: int, timesteps: int, channels: int, batch: int) -> list[str]:
    """Bytes per generation by part, and the thesis' capture extrapolated from the real format."""
    lines = [f"store bytes per generation ({generations} x {timesteps} x {channels}, batches of {batch}, "
             "conditional half only, uniform random values: top-k/max parts compress worse than real data):"]
    for name, size in sorted(parts.items()):
        lines.append(f"    {name:>12}: {size / generations:>12,.0f} B/generation ({size / MIB:,.1f} MiB in all)")
    per_value = parts.get("dense", 0) / (generations * timesteps * channels)
    topk_per_generation = parts.get("topk", 0) / generations  # 64 channels per (generation, timestep): width-free
    max_per_cell = parts.get("max", 0) / (-(-generations // batch) * timesteps * channels)  # per batch x T x F
    width = THESIS["raw"] + THESIS["sae"]
    dense_one_half = THESIS["timesteps"] * width * 2
    lines.append(f"thesis capture (SD v1.4 / Style50: {THESIS['generations']} generations x {THESIS['timesteps']} "
                 f"steps x ({THESIS['raw']} raw + {THESIS['sae']} SAE) channels), from this format "
                 f"(dense {per_value:.3f} B/value here, float16):")
    for label, halves in (("both CFG halves (default)", 2), ("keep_unconditional: false", 1)):
        dense = dense_one_half * halves
        summaries = 2 * topk_per_generation * THESIS["timesteps"] / timesteps
        for capture_batch in (4, 8):
            max_bytes = max_per_cell * THESIS["timesteps"] * width / capture_batch
            total = dense + summaries + max_bytes
            lines.append(f"    {label:<26} batch {capture_batch}: dense {dense / 1e6:.2f} MB + top-k "
                         f"{summaries / 1e6:.3f} MB + max {max_bytes / 1e6:.2f} MB = {total / 1e6:.2f} MB/generation, "
                         f"{total * THESIS['generations'] / 1e9:.1f} GB for {THESIS['generations']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=5000)
    parser.add_argument("--timesteps", type=int, default=50)
    parser.add_argument("--channels", type=int, default=256, help="width of the synthetic variant (thesis: 20480)")
    parser.add_argument("--batch", type=int, default=50, help="generations per store batch")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--memory-budget-mib", type=int, default=4096)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.5, 1.0])
    parser.add_argument("--no-summaries", action="store_true",
                        help="write the store as a capture with store_summaries: false (faster; no top-k/max parts)")
    parser.add_argument("--check-ratios", action="store_true", help="fail if peak RSS is not flat")
    parser.add_argument("--max-memory-ratio", type=float, default=1.25)
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the stores (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the stores and statistics")
    args = parser.parse_args(argv)
    if args.generations < args.batch or args.top_k > args.channels or args.timesteps < 3:
        parser.error("need --generations >= --batch, --top-k <= --channels and --timesteps >= 3")

    if args.workdir is not None:  # a folder on the disk to use, made if missing (was: FileNotFoundError from mkdtemp)
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ddr-bench-stats-scale-", dir=args.workdir))
    failures: list[str] = []
    try:
        full = workdir / "store_full"
        start = time.monotonic()
        answers = write_store(full, args.generations, args.timesteps, args.channels, args.batch,
                              summaries=not args.no_summaries)
        write_seconds = time.monotonic() - start
        parts = store_parts(full)
        print(f"synthetic store {args.generations} x {args.timesteps} x {args.channels} "
              f"({args.generations * args.timesteps * args.channels / 1e6:,.1f} M values, "
              f"{sum(parts.values()) / MIB:,.0f} MiB) written in {write_seconds:.0f} s")
        rows = []
        for scale in sorted(args.scales):
            generations = max(args.batch, int(round(args.generations * scale / args.batch)) * args.batch)
            generations = min(generations, args.generations)
            store = full if generations == args.generations else workdir / f"store_{generations}"
            if store != full:
                subset_store(full, store, generations, args.batch)
            out = workdir / f"stats_{generations}"
            result = run_stats(store, out, args.top_k, args.memory_budget_mib)
            problems = check_planted(out, answers, result["generations"], args.top_k)
            failures += [f"{generations} generations: {p}" for p in problems]
            if result["peak_rss"] > args.memory_budget_mib * MIB:
                failures.append(f"{generations} generations: peak RSS {result['peak_rss'] / MIB:.0f} MiB over the "
                                f"budget {args.memory_budget_mib} MiB")
            rows.append({"scale": scale, **result, "planted_ok": not problems})
            if not args.keep and store != full:
                shutil.rmtree(store)

        print(f"timestep_stats top_k={args.top_k}, memory_budget_mib={args.memory_budget_mib} "
              "(each scale in a fresh process; read pass with the page cache as the write left it):")
        print(f"    {'scale':>6} {'generations':>11} {'M values':>9} {'chunk<=':>7} {'stats s':>8} {'peak MiB':>9} "
              f"{'read MB/s':>10} {'M values/s':>11} {'planted':>8}")
        for row in rows:
            print(f"    {row['scale']:>6.3f} {row['generations']:>11} {row['values'] / 1e6:>9.1f} "
                  f"{row['chunk_generations']:>7} {row['seconds']:>8.1f} {row['peak_rss'] / MIB:>9.0f} "
                  f"{row['dense_bytes'] / 1e6 / max(row['read_seconds'], 1e-9):>10.0f} "
                  f"{row['values'] / 1e6 / max(row['read_seconds'], 1e-9):>11.1f} "
                  f"{'ok' if row['planted_ok'] else 'WRONG':>8}")
        base = rows[0]
        for row in rows[1:]:
            work = row["generations"] / base["generations"]
            memory = row["peak_rss"] / base["peak_rss"]
            marginal = (row["seconds"] - base["seconds"]) / (row["generations"] - base["generations"]) * 1000
            print(f"    {row['generations']} / {base['generations']} generations (x{work:.1f}): time "
                  f"x{row['seconds'] / base['seconds']:.2f} ({marginal:.2f} s per 1000 more generations), "
                  f"peak RSS x{memory:.3f}")
            if args.check_ratios and memory > args.max_memory_ratio:
                failures.append(f"peak RSS grows x{memory:.3f} from {base['generations']} to {row['generations']} "
                                f"generations (allowed x{args.max_memory_ratio})")
        print("\n".join(storage_report(parts, args.generations, args.timesteps, args.channels, args.batch)))
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("planted answers found at every scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
