"""Capture benchmark: images/s of hooked capture vs plain generation, same batch, same run.

Prints throughput and the hook's overhead as a ratio (capture time / plain time). No assertions.

    .venv/bin/python benchmarks/bench_capture.py                 # tiny model, CPU
    .venv/bin/python benchmarks/bench_capture.py --model-dir data/assets/models/sd-v1-4 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddr_core.basis import RawChannels, TopKSaeBasis
from ddr_core.families import load_model
from ddr_core.hooks import capture_activations
from ddr_core.sae import Sae
from ddr_core.tiny_model import TINY_PROMPTS, build_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=None, help="diffusers folder (default: build the tiny model)")
    parser.add_argument("--layer", default="up_blocks.1.attentions.1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sae-expansion", type=int, default=16, help="random SAE width = layer width x this")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or build_tiny_pipeline(Path(tmp) / "tiny")
        model = load_model(model_dir, device=device, dtype=dtype)
    pipe = model.pipe
    layer = model.resolve_layer(args.layer)
    width = model.layer_width(args.layer)
    sae = Sae.random(width, width * args.sae_expansion, k=32, seed=0).to(device)
    reducers = {"raw": RawChannels(None).reduce, "sae": TopKSaeBasis(sae).reduce}
    prompts = [TINY_PROMPTS[i % len(TINY_PROMPTS)] for i in range(args.batch_size)]
    size = model.default_size[0]

    def generate(capture: bool) -> float:
        latents = model.initial_latents(list(range(args.batch_size)), size, size, dtype=dtype, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            if capture:
                with model.track_timesteps() as tracker, capture_activations(layer, tracker, reducers, cfg=True):
                    pipe(prompt=prompts, latents=latents, num_inference_steps=args.steps, output_type="pil")
            else:
                pipe(prompt=prompts, latents=latents, num_inference_steps=args.steps, output_type="pil")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(False), generate(True)  # warm-up
    plain, captured = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both equally
        plain.append(generate(False))
        captured.append(generate(True))
    t_plain, t_capture = statistics.median(plain), statistics.median(captured)
    print(f"device={device} dtype={dtype} batch={args.batch_size} steps={args.steps} layer width={width} "
          f"SAE features={sae.num_latents}")
    print(f"plain generation : {args.batch_size / t_plain:8.2f} images/s ({t_plain:.3f} s/batch)")
    print(f"capture (raw+SAE): {args.batch_size / t_capture:8.2f} images/s ({t_capture:.3f} s/batch)")
    print(f"hook overhead ratio (capture / plain time): {t_capture / t_plain:.3f}")


if __name__ == "__main__":
    main()
