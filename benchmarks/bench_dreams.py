"""Deep-dream throughput: the batched optimiser vs one channel at a time (the thesis' loop).

Both modes run the same elements -- ``--channels`` channels, one timestep each (spread over the
schedule), ``--seeds`` start latents per channel -- for ``--steps`` optimisation steps, on the same
device in one process:

- **batched**: :func:`ddr_core.dreams.optimise_dreams` over ``--batch-size`` elements at a time, mixing
  channels and timesteps in one UNet forward;
- **looped**: one call per channel with only that channel's seeds batched (as the thesis did).

Prints channel-steps per second (one optimisation step of one (channel, timestep) with all its
seeds), channels per hour at ``--full-steps`` steps per dream, the speed-up, and the largest latent
difference between the two modes (elements are independent, so it should be float noise).
No timed assertions.

    .venv/bin/python benchmarks/bench_dreams.py                     # tiny model, CPU, < 2 minutes
    .venv/bin/python benchmarks/bench_dreams.py --model-dir data/assets/models/sd --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ddr_core.dreams import DreamConfig, DreamObjective, element_generators, element_seed, optimise_dreams
from ddr_core.families import load_model
from ddr_core.tiny_model import TINY_TARGET_LAYER, build_tiny_pipeline


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="diffusers folder (default: the tiny model)")
    parser.add_argument("--layer", default=TINY_TARGET_LAYER)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=1, help="start latents per channel (n_results)")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps timed per mode")
    parser.add_argument("--full-steps", type=int, default=100, help="steps of a real dream (for channels/hour)")
    parser.add_argument("--batch-size", type=int, default=32, help="elements per batched step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args()


def _elements(args: argparse.Namespace, pipe, width: int):
    channels = [c % width for c in range(args.channels)]
    timesteps = [int(50 + (900 * i) // max(args.channels - 1, 1)) for i in range(args.channels)]
    channels_in, size, _ = pipe.latent_shape(*pipe.default_size)
    rows = []
    for channel, timestep in zip(channels, timesteps, strict=True):
        for seed in range(args.seeds):
            latent = torch.randn(1, channels_in, size, size,
                                 generator=torch.Generator().manual_seed(1000 + seed))
            rows.append((channel, timestep, seed, latent))
    return rows


def _run(pipe, layer, rows, config, group_size: int) -> tuple[float, torch.Tensor]:
    """Optimise ``rows`` in groups of ``group_size``; returns (seconds, final latents)."""
    finals = []
    start = time.perf_counter()
    for first in range(0, len(rows), group_size):
        group = rows[first: first + group_size]
        objective = DreamObjective.raw([r[0] for r in group])
        generators = element_generators([element_seed(0, c, t, s) for c, t, s, _ in group])
        result = optimise_dreams(pipe, layer, objective, torch.cat([r[3] for r in group]),
                                 [r[1] for r in group], config, generators)
        finals.append(result.latents)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(finals)


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or build_tiny_pipeline(Path(tmp) / "tiny")
        pipe = load_model(model_dir, device=args.device,
                          dtype={"float32": torch.float32, "float16": torch.float16,
                                 "bfloat16": torch.bfloat16}[args.dtype])
    layer = pipe.resolve_layer(args.layer)
    width = pipe.layer_width(args.layer)
    config = DreamConfig(num_steps=args.steps, snapshot_every=0, use_prior=False, n_results=1, seeds=[0],
                         dtype=args.dtype)
    rows = _elements(args, pipe, width)
    warmup = config.model_copy(update={"num_steps": 1})
    _run(pipe, layer, rows[: args.batch_size], warmup, args.batch_size)
    _run(pipe, layer, rows[: args.seeds], warmup, args.seeds)

    batched_s, batched_latents = _run(pipe, layer, rows, config, args.batch_size)
    looped_s, looped_latents = _run(pipe, layer, rows, config, args.seeds)

    channel_steps = args.channels * args.steps
    device = torch.cuda.get_device_name() if pipe.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {device}; model: {model_dir if args.model_dir else 'tiny (embedded)'}; layer {args.layer}")
    print(f"{args.channels} channels x 1 timestep x {args.seeds} seed(s), {args.steps} steps; "
          f"batch {args.batch_size} elements vs {args.seeds} (one channel at a time)")
    for name, seconds in (("batched", batched_s), ("looped ", looped_s)):
        rate = channel_steps / seconds
        print(f"{name}: {seconds:8.2f} s  {rate:9.2f} channel-steps/s  "
              f"{rate * 3600 / args.full_steps:10.1f} channels/hour at {args.full_steps} steps")
    print(f"speed-up batched / looped: {looped_s / batched_s:.2f}x")
    print(f"max |latent difference| batched vs looped: {float((batched_latents - looped_latents).abs().max()):.2e}")


if __name__ == "__main__":
    main()
