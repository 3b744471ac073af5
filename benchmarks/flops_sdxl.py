"""FLOPs of SDXL-Turbo at real scale, counted on the meta device (shapes only: no weights, no memory, seconds on a
CPU), and the **estimated** hours of a full job on one H100.

Counted (``torch.utils.flop_counter.FlopCounterMode``, per batch element, like ``bench_gpu.count_flops`` for SD v1.4):

* one UNet step (a capture / prior step without CFG; Turbo runs guidance 0, so one row per image and step);
* one dream step: the UNet forward stopped after the layer, plus the backward to the latent, for each of the four
  sdxl-unbox blocks;
* the VAE decode of one image and both text encoders of one prompt.

The architecture is SDXL's (stabilityai/sdxl-turbo ships SDXL 1.0's UNet config: block widths 320/640/1280,
transformer depths 1/2/10, cross-attention 2048, text_time added conditions 6 x 256 + 1280); Turbo generates at
512 x 512 (a 64 x 64 latent). The hours assume the MFU the SD v1.4 stages reached on an H100-class GPU
(BENCHMARKS.md: capture ~21%, priors ~12%, dreams ~24%) carries over: **estimates, not measurements**.

    python benchmarks/flops_sdxl.py [--size 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

SDXL_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025,
)
TEXT_ENCODERS = {  # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers
    "clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "clip_bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu"),
}
LAYERS = ("down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.0",
          "up_blocks.0.attentions.1")

H100_PEAK_TFLOPS = 989.0  # dense BF16/FP16, H100 SXM
ASSUMED_MFU = {"capture": 0.21, "priors": 0.12, "dreams": 0.24}  # SD v1.4 on H100-class GPUs (BENCHMARKS.md)


def count_flops(size: int = 512, batch: int = 2) -> dict[str, Any]:
    """FLOPs per batch element of SDXL's UNet step, stopped forward + backward per layer, VAE decode, text."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ddr_core.hooks import forward_to_layer, hook_point_of
    from ddr_core.pipeline import resolve_layer

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text = {"clip_l": CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                       **TEXT_ENCODERS["clip_l"])),
                "clip_bigg": CLIPTextModelWithProjection(CLIPTextConfig(
                    vocab_size=49408, max_position_embeddings=77, projection_dim=1280, **TEXT_ENCODERS["clip_bigg"]))}
    unet.requires_grad_(False)
    side = size // 8
    latent = torch.randn(batch, 4, side, side, device=meta)
    timestep = torch.full((batch,), 999, device=meta, dtype=torch.long)
    context = torch.randn(batch, 77, 2048, device=meta)
    added = {"text_embeds": torch.randn(batch, 1280, device=meta), "time_ids": torch.randn(batch, 6, device=meta)}

    def total(fn: Callable[[], Any]) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops()) // batch

    result: dict[str, Any] = {
        "size": size,
        "unet_step": total(lambda: unet(latent, timestep, encoder_hidden_states=context, added_cond_kwargs=added)),
        "vae_decode": total(lambda: vae.decode(latent)),
        "text_encoders": sum(total(lambda m=m: m(torch.zeros(batch, 77, dtype=torch.long, device=meta)))
                             for m in text.values()),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "layers": {},
    }
    for name in LAYERS:
        point = hook_point_of(name, resolve_layer(unet, name), "residual")

        def stopped_backward(point=point) -> None:
            x = latent.clone().requires_grad_(True)
            forward_to_layer(unet, point, x, timestep, context, added_cond_kwargs=added).float().mean().backward()

        result["layers"][name] = {
            "forward_to_layer": total(lambda point=point: forward_to_layer(unet, point, latent, timestep, context,
                                                                           added_cond_kwargs=added)),
            "dream_step": total(stopped_backward),
        }
    return result


def job_estimate(flops: dict[str, Any], *, prompts: int, images_per_prompt: int, steps: int, features: int,
                 prior_seeds: int, dream_timesteps: int, dream_seeds: int, dream_steps: int) -> dict[str, float]:
    """Estimated H100 hours of one sdxl-unbox variant (``features`` SAE features of one layer, the mean dream step
    over the four layers), at :data:`ASSUMED_MFU`."""
    rate = {stage: H100_PEAK_TFLOPS * 1e12 * mfu for stage, mfu in ASSUMED_MFU.items()}
    images = prompts * images_per_prompt
    capture = images * (steps * flops["unet_step"] + flops["vae_decode"] + flops["text_encoders"])
    priors = features * prior_seeds * (steps * flops["unet_step"] + flops["vae_decode"])
    dream_step = sum(layer["dream_step"] for layer in flops["layers"].values()) / len(flops["layers"])
    dreams = features * dream_timesteps * dream_seeds * (dream_steps * dream_step + flops["vae_decode"])
    hours = {"capture": capture / rate["capture"] / 3600, "priors": priors / rate["priors"] / 3600,
             "dreams": dreams / rate["dreams"] / 3600}
    hours["total"] = sum(hours.values())
    return hours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (Turbo: 512)")
    parser.add_argument("--prompts", type=int, default=1000, help="unique prompts captured")
    parser.add_argument("--images-per-prompt", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="Turbo steps (1-4)")
    parser.add_argument("--json", help="write the counts and estimates here")
    args = parser.parse_args()
    flops = count_flops(args.size)
    settings = dict(prompts=args.prompts, images_per_prompt=args.images_per_prompt, steps=args.steps, features=5120,
                    prior_seeds=5, dream_timesteps=min(args.steps, 3), dream_seeds=5, dream_steps=100)
    hours = job_estimate(flops, **settings)
    print(f"SDXL UNet at {args.size}x{args.size}: {flops['unet_parameters'] / 1e9:.2f} B parameters")
    print(f"  one UNet step (capture/prior, no CFG): {flops['unet_step'] / 1e12:.2f} TFLOP per image")
    print(f"  VAE decode: {flops['vae_decode'] / 1e12:.2f} TFLOP, text encoders: {flops['text_encoders'] / 1e9:.1f} GFLOP")
    for name, layer in flops["layers"].items():
        print(f"  {name}: forward to layer {layer['forward_to_layer'] / 1e12:.2f} TFLOP, dream step (fwd + bwd) "
              f"{layer['dream_step'] / 1e12:.2f} TFLOP")
    print(f"ESTIMATE, one H100 at the SD v1.4 MFU ({ASSUMED_MFU}), one 5120-feature sdxl-unbox variant, {settings}:")
    for stage, value in hours.items():
        print(f"  {stage}: {value:.1f} h")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"flops": flops, "settings": settings, "assumed_mfu": ASSUMED_MFU,
                       "peak_tflops": H100_PEAK_TFLOPS, "estimated_hours": hours}, handle, indent=2)


if __name__ == "__main__":
    main()
