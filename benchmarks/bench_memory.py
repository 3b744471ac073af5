"""Memory benchmark: peak RSS of capture and of timestep statistics, each in a fresh subprocess.

(a) Capture on the tiny model for two prompt-set sizes (default 8 and 64 generations): peak RSS must
    not grow with the number of prompts (batches are written and dropped one at a time).
(b) Timestep statistics over a synthetic activation store of G x T x F (generation, timestep, channel)
    values (default 2000 x 50 x 128 = 12.8 M), written with ``ActivationStore.write_batch``, computed
    with a DuckDB ``memory_limit``; target: peak RSS within 4 GiB.

Peak RSS is the child's own ``VmHWM`` (:mod:`child_rss`). Prints a table;
exits non-zero if a target is missed.

    .venv/bin/python benchmarks/bench_memory.py
    .venv/bin/python benchmarks/bench_memory.py --generations 2000 --timesteps 50 --channels 1280
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_rss import PEAK_RSS_FUNCTION  # noqa: E402

GIB = 1024**3

CAPTURE_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from ddr_core.activations import CaptureConfig, run_capture
    from ddr_core.basis import RawChannels
    from ddr_core.pipeline import load_pipeline
    from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER
    model_dir, root, generations, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    prompts = list(TINY_PROMPTS)
    images = -(-generations // len(prompts))
    prompts = prompts[: -(-generations // images)]
    pipe = load_pipeline(model_dir)
    rss_loaded = peak_rss()
    result = run_capture(pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, prompts, root, root.parent,
                         CaptureConfig(num_images_per_prompt=images, batch_size=4, num_inference_steps=steps,
                                       seed=0))
    print(json.dumps({"generations": result.summary["generations"], "seconds": result.seconds,
                      "rss_after_load": rss_loaded,
                      "peak_rss": peak_rss()}))
""").replace("model_dir, root,", PEAK_RSS_FUNCTION + "model_dir, root,", 1)

STORE_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from ddr_core.activation_store import ActivationStore, VariantBatch
    root, G, T, F, per_batch = sys.argv[1], *map(int, sys.argv[2:6])
    rng = np.random.default_rng(0)
    store = ActivationStore(root)
    timesteps = list(range(981, 0, -(981 // T)))[:T]
    for b, start in enumerate(range(0, G, per_batch)):
        ids = range(start, min(start + per_batch, G))
        rows = [{"generation_id": g, "prompt_index": g, "prompt": f"prompt {g}", "image_index": 0, "seed": g,
                 "image_path": f"images/gen_{g:07d}.png"} for g in ids]
        values = rng.gamma(0.5, 1.0, size=(len(ids), T, F)).astype(np.float16)
        store.write_batch(b, rows, timesteps, {"raw": VariantBatch(values)}, capture_top_k=min(64, F))
    store.finalize()
""")

STATS_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from ddr_core.activation_store import ActivationStore
    from ddr_core.statistics import TimestepStatsConfig, compute_timestep_stats
    root, out, limit, top_k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    start = time.monotonic()
    summary = compute_timestep_stats(ActivationStore(root), "raw", out, TimestepStatsConfig(top_k=top_k),
                                     duckdb_memory_limit=limit)
    print(json.dumps({"seconds": time.monotonic() - start, "generations": summary.n_generations,
                      "active_channels": summary.active_channel_count,
                      "peak_rss": peak_rss()}))
""").replace("root, out, limit,", PEAK_RSS_FUNCTION + "root, out, limit,", 1)


def _child(script: str, *args: object) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[8, 64], help="generations of the two captures")
    parser.add_argument("--capture-steps", type=int, default=4)
    parser.add_argument("--generations", type=int, default=2000)
    parser.add_argument("--timesteps", type=int, default=50)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--batch", type=int, default=100, help="generations per store batch")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--duckdb-memory-limit", default="1GB")
    parser.add_argument("--max-ratio", type=float, default=1.25, help="capture RSS growth allowed (large/small)")
    parser.add_argument("--max-stats-gib", type=float, default=4.0)
    parser.add_argument("--skip-capture", action="store_true")
    args = parser.parse_args()
    failures = []

    with tempfile.TemporaryDirectory(prefix="ddr-bench-memory-") as tmp:
        tmp_path = Path(tmp)
        if not args.skip_capture:
            from ddr_core.tiny_model import build_tiny_pipeline

            model_dir = build_tiny_pipeline(tmp_path / "tiny")
            runs = [_child(CAPTURE_CHILD, model_dir, tmp_path / f"capture_{n}" / "store", n, args.capture_steps)
                    for n in args.sizes]
            print("(a) capture peak RSS (tiny model, CPU, fresh process each)")
            print(f"    {'generations':>11} {'after load MiB':>15} {'peak MiB':>9} {'seconds':>8}")
            for run in runs:
                print(f"    {run['generations']:>11} {run['rss_after_load'] / 2**20:>15.1f} "
                      f"{run['peak_rss'] / 2**20:>9.1f} {run['seconds']:>8.1f}")
            ratio = runs[1]["peak_rss"] / runs[0]["peak_rss"]
            print(f"    peak RSS ratio {runs[1]['generations']}/{runs[0]['generations']} generations: {ratio:.3f} "
                  f"(target <= {args.max_ratio})")
            if ratio > args.max_ratio:
                failures.append(f"capture RSS grows with prompt count: ratio {ratio:.3f}")

        values = args.generations * args.timesteps * args.channels
        store = tmp_path / "synthetic" / "store"
        start = time.monotonic()
        _child(STORE_CHILD, store, args.generations, args.timesteps, args.channels, args.batch)
        write_seconds = time.monotonic() - start
        stats = _child(STATS_CHILD, store, tmp_path / "synthetic" / "stats", args.duckdb_memory_limit, args.top_k)
        store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        print(f"(b) timestep statistics over {args.generations} x {args.timesteps} x {args.channels} = "
              f"{values / 1e6:.1f} M values (store {store_bytes / 2**20:.0f} MiB, written in {write_seconds:.0f} s)")
        print(f"    top_k={args.top_k}, DuckDB memory_limit={args.duckdb_memory_limit}: {stats['seconds']:.1f} s, "
              f"peak RSS {stats['peak_rss'] / 2**20:.0f} MiB (target <= {args.max_stats_gib} GiB), "
              f"{stats['active_channels']} active channels")
        if stats["peak_rss"] > args.max_stats_gib * GIB:
            failures.append(f"statistics peak RSS {stats['peak_rss'] / GIB:.2f} GiB")

    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))
    print("all memory targets met")


if __name__ == "__main__":
    main()
