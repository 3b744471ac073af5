"""FLOPs of FLUX.1-schnell at real scale, counted on the meta device, and the hours of a full job (ESTIMATES).

Nothing is downloaded and nothing is computed: the transformer, VAE and text encoders are built from
FLUX.1-schnell's architecture configs (:data:`SCHNELL_TRANSFORMER`, :data:`SCHNELL_VAE`, :data:`T5_XXL`,
:data:`CLIP_L`) on ``torch.device("meta")`` and ``torch.utils.flop_counter.FlopCounterMode`` counts every
matmul of one call (on meta, ``scaled_dot_product_attention`` runs its math path, so attention is counted as
its two ``bmm``: ``4 * b * h * s_q * s_k * d``). Counted per batch element:

- **capture step**: one full transformer forward at ``--size`` pixels (1024: 4096 image tokens) with
  ``--text-tokens`` T5 tokens (256: FLUX.1-schnell's reference length), as :meth:`FluxFamily.generate`
  runs it;
- **dream step**: the forward stopped after ``--layer`` (:meth:`FluxFamily.forward_to_layer`, the
  platform's hook point on the block's image tokens) plus the backward to the latent with frozen weights
  (what :func:`ddr_core.dreams.optimise_dreams` asks autograd for);
- VAE decode, T5-XXL and CLIP-L text encoding (once per image in a generation).

An analytic count checks the transformer numbers: per block and token ``24 D^2`` (q, k, v, out and the
4x MLP of a dual-stream block's two streams; q, k, v, MLP-in and the fused out-projection of a
single-stream block) plus ``4 S D`` attention, ``S`` = image + text tokens, ``D`` = 3072.

The job estimate (``--prompts`` x ``--images-per-prompt`` capture images of ``--steps`` steps; priors of
every channel of the layer x ``--prior-seeds`` at ``--steps``; dreams of every channel x
``--dream-timesteps`` x ``--dream-seeds`` x ``--dream-steps``, plus the quality check's forwards) divides
counted FLOPs by ``--mfu`` x ``--peak-tflops`` (989: H100 SXM dense BF16). The MFU is an assumption (the
SD v1.4 benchmark measured 21-24% for capture and batched dreams on an H100, BENCHMARKS.md), not a
measurement of FLUX.

    .venv/bin/python benchmarks/flops_flux.py                  # about a minute on a CPU, little memory
    .venv/bin/python benchmarks/flops_flux.py --size 512 --json flops_flux.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddr_core.families.flux import (  # noqa: E402
    latent_image_ids,
    pack_latents,
    read_image_tokens,
    write_image_tokens,
)
from ddr_core.hooks import HookPoint  # noqa: E402

SCHNELL_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
"""``black-forest-labs/FLUX.1-schnell`` ``transformer/config.json`` (11.89 B parameters)."""
SCHNELL_TRANSFORMER_PARAMETERS = 11_891_178_560  # dev: 11_901_408_320 (plus the guidance embedder)

SCHNELL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
}
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}


def _count(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def analytic_transformer(
    size: int, text_tokens: int, blocks: int, config: dict[str, Any] = SCHNELL_TRANSFORMER
) -> int:
    """``blocks`` transformer blocks on one element (see the module docstring): ``sum 24 D^2 S + 4 S^2 D``."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (size // 16) ** 2 + text_tokens
    return blocks * (24 * hidden**2 * tokens + 4 * tokens**2 * hidden)


def count_flops_flux(
    size: int = 1024, text_tokens: int = 256, layer: str = "transformer_blocks.18"
) -> dict[str, Any]:
    """FLOPs per element of one FLUX.1-schnell capture step, dream step, VAE decode and text encoding."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ddr_core.hooks import StopForward, stop_after_layer
    from ddr_core.pipeline import resolve_layer

    meta = torch.device("meta")
    with meta:
        transformer = FluxTransformer2DModel(**SCHNELL_TRANSFORMER)
        vae = AutoencoderKL(**SCHNELL_VAE)
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    parameters = sum(p.numel() for p in transformer.parameters())
    if parameters != SCHNELL_TRANSFORMER_PARAMETERS:
        raise RuntimeError(
            f"the FLUX.1-schnell config gives {parameters} parameters, expected "
            f"{SCHNELL_TRANSFORMER_PARAMETERS}: the config or diffusers changed"
        )
    transformer.requires_grad_(False)
    batch, side = 2, size // 8  # counted at batch 2, reported per element
    latent = torch.randn(batch, 16, side, side, device=meta)
    inputs = {
        "encoder_hidden_states": torch.randn(batch, text_tokens, T5_XXL["d_model"], device=meta),
        "pooled_projections": torch.randn(batch, CLIP_L["hidden_size"], device=meta),
        "timestep": torch.full((batch,), 0.5, device=meta),
        "img_ids": latent_image_ids(side, side, meta),
        "txt_ids": torch.zeros(text_tokens, 3, device=meta),
        "return_dict": False,
    }
    point = HookPoint(layer, resolve_layer(transformer, layer), read_image_tokens, write_image_tokens)

    def to_layer(sample: torch.Tensor) -> torch.Tensor:
        with stop_after_layer(point):
            try:
                transformer(hidden_states=pack_latents(sample), **inputs)
            except StopForward as stop:
                return stop.output
        raise RuntimeError(f"{layer} was never called")

    def dream_step() -> None:
        sample = latent.clone().requires_grad_(True)
        to_layer(sample).float().mean().backward()

    full = _count(lambda: transformer(hidden_states=pack_latents(latent), **inputs))
    stopped = _count(lambda: to_layer(latent))
    dream = _count(dream_step)
    decode = _count(lambda: vae.decode(latent))
    t5_flops = _count(lambda: t5(torch.zeros(batch, text_tokens, dtype=torch.long, device=meta)))
    clip_flops = _count(lambda: clip(torch.zeros(batch, 77, dtype=torch.long, device=meta)))
    blocks_to_layer = (
        int(layer.split(".")[1]) + 1
        if layer.startswith("transformer_blocks.")
        else SCHNELL_TRANSFORMER["num_layers"] + int(layer.split(".")[1]) + 1
    )
    return {
        "size": size,
        "image_tokens": (size // 16) ** 2,
        "text_tokens": text_tokens,
        "layer": layer,
        "layer_output_shape": [(size // 16) ** 2, 3072],
        "transformer_parameters": parameters,
        "capture_step": full // batch,
        "forward_to_layer": stopped // batch,
        "dream_step": dream // batch,
        "vae_decode": decode // batch,
        "t5_encode": t5_flops // batch,
        "clip_encode": clip_flops // batch,
        "analytic_capture_step_blocks": analytic_transformer(size, text_tokens, 57),
        "analytic_forward_to_layer_blocks": analytic_transformer(size, text_tokens, blocks_to_layer),
    }


def job_estimate(flops: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Hours on one GPU of capture, priors and dreams of one raw variant (ESTIMATES: assumed MFU)."""
    rate = args.mfu * args.peak_tflops * 1e12
    images = args.prompts * args.images_per_prompt
    per_image = (
        flops["capture_step"] * args.steps + flops["vae_decode"] + flops["t5_encode"] + flops["clip_encode"]
    )
    capture = images * per_image
    prior_images = args.width * args.prior_seeds
    priors = prior_images * (flops["capture_step"] * args.steps + flops["vae_decode"])
    elements = args.width * args.dream_timesteps * args.dream_seeds
    dreams = elements * (
        flops["dream_step"] * args.dream_steps
        + flops["forward_to_layer"] * (1 + args.quality_draws)
        + flops["vae_decode"]
    )
    hours = {
        name: value / rate / 3600
        for name, value in (("capture", capture), ("priors", priors), ("dreams", dreams))
    }
    return {
        "assumptions": {
            k: getattr(args, k)
            for k in (
                "prompts",
                "images_per_prompt",
                "steps",
                "width",
                "prior_seeds",
                "dream_timesteps",
                "dream_seeds",
                "dream_steps",
                "quality_draws",
                "mfu",
                "peak_tflops",
            )
        },
        "flop": {"capture": capture, "priors": priors, "dreams": dreams},
        "hours_estimate": {
            **{k: round(v, 2) for k, v in hours.items()},
            "total": round(sum(hours.values()), 1),
        },
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 16)")
    parser.add_argument("--text-tokens", type=int, default=256, help="T5 tokens (schnell 256, dev 512)")
    parser.add_argument("--layer", default="transformer_blocks.18")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--images-per-prompt", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of capture and priors")
    parser.add_argument(
        "--width", type=int, default=3072, help="channels of the variant (raw: the hidden size)"
    )
    parser.add_argument("--prior-seeds", type=int, default=5)
    parser.add_argument(
        "--dream-timesteps", type=int, default=2, help="per channel: t=0 and one activity peak"
    )
    parser.add_argument("--dream-seeds", type=int, default=5)
    parser.add_argument("--dream-steps", type=int, default=100)
    parser.add_argument("--quality-draws", type=int, default=4, help="noise draws of the dream quality check")
    parser.add_argument("--mfu", type=float, default=0.25, help="ASSUMED model FLOP utilisation")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense BF16")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    flops = count_flops_flux(args.size, args.text_tokens, args.layer)
    result = {"flops_per_element": flops, "job": job_estimate(flops, args)}
    tera = {
        k: round(v / 1e12, 2)
        for k, v in flops.items()
        if isinstance(v, int)
        and k != "transformer_parameters"
        and k not in ("size", "image_tokens", "text_tokens")
    }
    print(
        f"FLUX.1-schnell at {args.size}x{args.size}, {args.text_tokens} T5 tokens, layer {args.layer} "
        "(TFLOP per element):"
    )
    for name, value in tera.items():
        print(f"  {name:34s} {value:10.2f}")
    print(
        f"ESTIMATED hours on one GPU at {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s: "
        f"{result['job']['hours_estimate']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
