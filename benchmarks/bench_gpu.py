"""GPU benchmark of the platform's hot paths on a Stable Diffusion v1.4-shaped model (random weights).

What is built (nothing is downloaded; every weight is random, seeded):

- **UNet**: SD v1.4's architecture from an explicit config (:data:`SD14_UNET_CONFIG`: widths
  320/640/1280/1280, 2 layers per block, 8 attention heads, cross-attention width 768, 64x64
  latents; ``UNet2DConditionModel()``'s own defaults are *not* SD v1.x). 859.52 M parameters,
  checked at start-up. Target layer ``up_blocks.1.attentions.1``, output ``(B, 1280, 16, 16)``.
- **Text encoder**: a CLIP text transformer with SD's shape (width 768, 12 layers, 12 heads,
  MLP 3072, 77 positions) over our small word-level tokenizer (so its vocabulary is small).
- **VAE**: SD's ``AutoencoderKL`` config (128/256/512/512, 2 layers per block, 4 latent channels).
- **Scheduler**: DDIM configured like SD v1.x.

Throughput does not depend on weight values (no data-dependent control flow), and the UNet
dominates every stage (text encoding is once per batch, VAE decoding once per image), so the
numbers stand for the real checkpoint. Random weights only change *what* is drawn.

Sections (each uses the platform's own code path):

1. **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (exact shapes, no
   compute): full UNet forward, forward stopped after the layer, stopped forward + backward to the
   latent, VAE decode, text encoder; attention is counted (checked first: the benchmark device's
   SDPA kernel must have a FLOP formula; PyTorch has none for the CPU flash kernel, so one is
   registered here, the standard ``4 * b * h * s_q * s_k * d`` forward / 2.5x backward).
2. **Dreams**: :func:`ddr_core.dreams.optimise_dreams` with :class:`DreamObjective` (raw channels
   and, once, SAE features), batched at each ``--batch`` size vs one element at a time.
3. **Capture**: the pipeline under :class:`TimestepTracker` + :func:`capture_activations` (raw spatial
   mean + a random 16x SAE), classifier-free guidance on (2 UNet rows per image).
4. **Priors**: :func:`ddr_core.priors.generate_priors` (empty prompt, guidance 1, steered channels).
5. **Truncated forward** (``--compile``): an explicit forward that stops at the layer without an
   exception (:func:`truncated_forward`), eager and ``torch.compile(fullgraph=True)``, vs the hook
   that raises (:func:`ddr_core.hooks.forward_to_layer`), timed as forward + backward to the latent.

6. **Compare** (``--compare``, only this): first capture with the recording's per-step copies to the CPU
   (``host_copies: per_step``, the path before issue #19: a host-device sync per step) vs one copy per batch
   (``per_batch``, today's default), eager, alternating, with the ratio, whether the recorded values are
   identical on the device and (CUDA) the syncs counted in a 2-step generation; then dreams and capture on
   today's path (eager, the platform's defaults) and on each ``--tuned``
   :class:`ddr_core.performance.PerformanceConfig` (regional ``torch.compile``, ``channels_last``, SDPA kernel,
   fused QKV, autocast) with larger batches, one after the other on the same device, with the ratio to today's
   path and the MFU targets of issue #19 (dreams >= 35%, capture >= 30%).

MFU = achieved model FLOP/s (counted FLOPs per item x items/s) / ``--peak-tflops`` (default 989:
H100 SXM dense BF16 tensor-core peak; use ~756 for H100 PCIe, 1979 only with sparsity).
Sections stop once ``--budget-s`` is spent; the summary says what ran.

    .venv/bin/python benchmarks/bench_gpu.py                            # H100, bf16, < 5 minutes
    .venv/bin/python benchmarks/bench_gpu.py --compile --channels-last --out bench_gpu.json
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick       # smoke test, numbers meaningless
    .venv/bin/python benchmarks/bench_gpu.py --flops-only               # FLOP counts only (any machine)
    .venv/bin/python benchmarks/bench_gpu.py --compare --budget-s 540   # today's path vs the tuned ones (issue #19)
    .venv/bin/python benchmarks/bench_gpu.py --compare --quick --device cpu   # its smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddr_core.basis import RawChannels, TopKSaeBasis
from ddr_core.dreams import DreamConfig, DreamObjective, element_generators, element_seed, optimise_dreams
from ddr_core.families import as_model
from ddr_core.hooks import (
    TimestepTracker,
    capture_activations,
    forward_to_layer,
)
from ddr_core.pipeline import resolve_layer
from ddr_core.priors import generate_priors
from ddr_core.sae import Sae
from ddr_core.tiny_model import TINY_PROMPTS, tiny_vocabulary

TARGET_LAYER = "up_blocks.1.attentions.1"
SD14_UNET_PARAMETERS = 859_520_964
SD14_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
}
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}

# --quick: the same block structure (the layer exists, 4 levels, 8x VAE) at toy widths and 16x16 latents.
QUICK_UNET_CONFIG = {**SD14_UNET_CONFIG, "sample_size": 16, "block_out_channels": (32, 64, 64, 64),
                     "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 64}
QUICK_VAE_CONFIG = {**SD_VAE_CONFIG, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1,
                    "sample_size": 128}
QUICK_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------


def build_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tokenizer_dir: Path):
    """A ``StableDiffusionPipeline`` of randomly initialised SD-shaped components on ``device``/``dtype``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddr_core.tokenizer import build_word_tokenizer

    unet_config = QUICK_UNET_CONFIG if args.quick else SD14_UNET_CONFIG
    vae_config = QUICK_VAE_CONFIG if args.quick else SD_VAE_CONFIG
    text = QUICK_TEXT if args.quick else SD_TEXT
    tokenizer = build_word_tokenizer(tiny_vocabulary(), tokenizer_dir)
    torch.manual_seed(0)
    with torch.device(device):  # initialise directly on the device (fast for 860 M parameters)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
            projection_dim=text["hidden_size"], bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text,
        ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval()
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe, unet_config, vae_config, text


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# The explicit truncated forward (no exception: torch.compile(fullgraph=True) sees one graph)
# --------------------------------------------------------------------------------------------------


def truncated_forward(unet: nn.Module, up_block: int, attention: int, sample: torch.Tensor,
                      timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """``UNet2DConditionModel.forward`` up to the output of ``up_blocks[up_block].attentions[attention]``.

    Covers the SD v1.x configuration (no class/addition embeddings, adapters, ControlNet residuals,
    FreeU or attention masks) with latents whose side is a multiple of ``2**(levels-1)`` (so no
    ``upsample_size`` is forwarded).

    Args:
        sample: ``(B, 4, h, w)``; timestep: ``(B,)``; encoder_hidden_states: ``(B, tokens, dim)``.

    Returns:
        The layer output ``(B, C, h', w')`` (``(B, 1280, 16, 16)`` for SD at 64x64).
    """
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    hidden = unet.conv_in(sample)
    residuals: tuple[torch.Tensor, ...] = (hidden,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, res = block(hidden_states=hidden, temb=emb)
        residuals += res
    hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
    for index, block in enumerate(unet.up_blocks):
        res = residuals[-len(block.resnets):]
        residuals = residuals[: -len(block.resnets)]
        if index < up_block:
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=encoder_hidden_states)
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res)
            continue
        for position, (resnet, attn) in enumerate(zip(block.resnets, block.attentions, strict=True)):
            hidden = torch.cat([hidden, res[-1 - position]], dim=1)
            hidden = resnet(hidden, emb)
            hidden = attn(hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
            if position == attention:
                return hidden
    raise ValueError(f"up_blocks.{up_block}.attentions.{attention} does not exist")


# --------------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------------


def _register_cpu_attention_formulas() -> list[str]:
    """FLOP formulas for PyTorch's CPU flash-attention kernels, which FlopCounterMode does not know
    (the CUDA flash / efficient / cuDNN kernels are registered upstream). Returns what was added."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    added = []
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is not None and forward not in fc.flop_registry and forward.default not in fc.flop_registry:
        fc.register_flop_formula(forward)(
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v))
        added.append("aten._scaled_dot_product_flash_attention_for_cpu")
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None and backward not in fc.flop_registry and backward.default not in fc.flop_registry:
        fc.register_flop_formula(backward)(
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(grad, q, k, v))
        added.append("aten._scaled_dot_product_flash_attention_for_cpu_backward")
    return added


def attention_counting_check(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Count one SDPA forward (+ backward) on ``device`` and compare with ``4 b h s_q s_k d`` (x3.5 with backward)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    registered = _register_cpu_attention_formulas()
    b, h, sq, sk, d = 2, 8, 256, 77, 40
    query = torch.randn(b, h, sq, d, device=device, dtype=dtype, requires_grad=True)
    key = torch.randn(b, h, sk, d, device=device, dtype=dtype)
    value = torch.randn(b, h, sk, d, device=device, dtype=dtype)
    expected = 4 * b * h * sq * sk * d
    with FlopCounterMode(display=False) as counter:
        out = F.scaled_dot_product_attention(query, key, value)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(query, key, value).sum().backward()
    with_backward = counter.get_total_flops()
    del out
    return {"expected_forward": expected, "counted_forward": forward, "counted_forward_backward": with_backward,
            "formulas_registered_here": registered, "ok": forward == expected and with_backward > forward}


def count_flops(args: argparse.Namespace, unet_config: dict, vae_config: dict, text: dict) -> dict[str, Any]:
    """FLOPs per batch element, counted on the meta device (shapes only, no compute, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                    projection_dim=text["hidden_size"], **text))
    layer = resolve_layer(unet, TARGET_LAYER)
    size = unet_config["sample_size"]
    batch = 2  # count at batch 2, report per element (checks nothing is batch-constant by accident)
    latent = torch.randn(batch, 4, size, size, device=meta)
    timestep = torch.full((batch,), 500, device=meta, dtype=torch.long)
    context = torch.randn(batch, 77, unet_config["cross_attention_dim"], device=meta)

    def total(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
        with FlopCounterMode(display=False) as counter:
            fn()
        by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
        return int(counter.get_total_flops()), by_op

    full, full_ops = total(lambda: unet(latent, timestep, encoder_hidden_states=context))
    stopped, _ = total(lambda: forward_to_layer(unet, layer, latent, timestep, context))
    out_shape = tuple(forward_to_layer(unet, layer, latent, timestep, context).shape)

    # Only the latent needs a gradient (as in optimise_dreams' autograd.grad(loss, latents)); with frozen
    # weights .backward() computes exactly that (autograd.grad itself trips FlopCounterMode's module hooks).
    unet.requires_grad_(False)

    def stopped_backward() -> None:
        x = latent.clone().requires_grad_(True)
        forward_to_layer(unet, layer, x, timestep, context).float().mean().backward()

    dream, dream_ops = total(stopped_backward)
    vae_decode, _ = total(lambda: vae.decode(latent))
    tokens = torch.zeros(batch, 77, dtype=torch.long, device=meta)
    text_flops, _ = total(lambda: text_encoder(tokens))
    attention_ops = {k: v // batch for k, v in full_ops.items() if "attention" in k or "bmm" in k or "baddbmm" in k}
    return {
        "unet_forward": full // batch,
        "unet_forward_to_layer": stopped // batch,
        "stopped_share": stopped / full,
        "unet_forward_to_layer_plus_backward_to_latent": dream // batch,
        "vae_decode": vae_decode // batch,
        "text_encoder": text_flops // batch,
        "layer_output_shape": list(out_shape[1:]),
        "unet_forward_attention_ops": attention_ops,
        "dream_ops": {k: v // batch for k, v in dream_ops.items()},
        "unet_parameters": count_parameters(unet),
    }


# --------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process max RSS (Linux: KiB)


class Budget:
    """A wall-clock budget: sections start only while time is left."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    @property
    def spent(self) -> float:
        return time.monotonic() - self.start


@contextmanager
def section(name: str, results: dict[str, Any], budget: Budget, device: torch.device, need_s: float = 0.0):
    """Run a section unless the budget is spent; record its result, time, peak memory or error."""
    entry: dict[str, Any] = {}
    results["sections"][name] = entry
    if budget.left < need_s:
        entry["status"] = f"skipped: budget spent ({budget.spent:.0f} s of {budget.seconds:.0f} s)"
        print(f"\n== {name}: {entry['status']}")
        yield None
        return
    print(f"\n== {name}", flush=True)
    reset_peak(device)
    start = time.monotonic()
    try:
        yield entry
        entry["status"] = entry.get("status", "ok")
    except Exception as error:  # a section failing must not lose the others' numbers
        entry["status"] = f"failed: {type(error).__name__}: {error}"
        print(f"   {entry['status']}")
        traceback.print_exc(limit=3)
    entry["seconds"] = round(time.monotonic() - start, 2)
    entry["peak_memory_gib"] = round(peak_memory_gib(device), 3)


def mfu(flops_per_item: float, items_per_s: float, peak_tflops: float) -> float:
    return flops_per_item * items_per_s / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def bench_dreams(args, pipe, dtype_name: str, flops: dict, budget: Budget, entry: dict) -> None:
    """optimise_dreams: each --batch size vs one element at a time, raw channels; one SAE run."""
    layer = resolve_layer(pipe.unet, TARGET_LAYER)
    size = pipe.unet.config.sample_size
    width = 1280 if not args.quick else pipe.unet.config.block_out_channels[-2]
    config = DreamConfig(num_steps=args.dream_steps, snapshot_every=0, use_prior=False, n_results=1, seeds=[0],
                         dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name])
    per_step = flops["unet_forward_to_layer_plus_backward_to_latent"]

    def run(batch: int, steps: int, sae: Sae | None = None) -> float:
        channels = [(7 * i) % width for i in range(batch)]
        timesteps = [int(50 + (900 * i) // max(batch - 1, 1)) for i in range(batch)]
        init = torch.cat([torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(i))
                          for i in range(batch)])
        objective = DreamObjective(torch.tensor(channels), TopKSaeBasis(sae) if sae is not None else RawChannels(None))
        generators = element_generators([element_seed(0, c, t, 0) for c, t in zip(channels, timesteps, strict=True)])
        synchronize(pipe.unet.device)
        start = time.perf_counter()
        optimise_dreams(pipe, layer, objective, init, timesteps, config.model_copy(update={"num_steps": steps}),
                        generators)
        synchronize(pipe.unet.device)
        return time.perf_counter() - start

    rows = []
    for batch in sorted(set(args.batch)):
        if budget.left < 10:
            entry["status"] = "partial: budget spent"
            break
        run(batch, 1)  # warm-up (kernel selection, allocator)
        reset_peak(pipe.unet.device)
        seconds = run(batch, args.dream_steps)
        rate = batch * args.dream_steps / seconds
        rows.append({"batch": batch, "channel_steps_per_s": rate, "seconds": seconds,
                     "mfu": mfu(per_step, rate, args.peak_tflops),
                     "peak_memory_gib": peak_memory_gib(pipe.unet.device)})
        print(f"   batch {batch:4d}: {rate:9.2f} channel-steps/s  MFU {rows[-1]['mfu']:.1%}  "
              f"peak {rows[-1]['peak_memory_gib']:.2f} GiB")
    entry["batched"] = rows
    # one at a time: the same number of element-steps as the largest batch, one element per call
    largest = max(args.batch)
    if budget.left > 10:
        n = min(largest, 8)
        seconds = sum(run(1, args.dream_steps) for _ in range(n))
        rate = n * args.dream_steps / seconds
        entry["one_at_a_time"] = {"elements": n, "channel_steps_per_s": rate,
                                  "mfu": mfu(per_step, rate, args.peak_tflops)}
        print(f"   one at a time ({n} elements): {rate:9.2f} channel-steps/s  "
              f"MFU {entry['one_at_a_time']['mfu']:.1%}")
        best = max(rows, key=lambda r: r["channel_steps_per_s"]) if rows else None
        if best:
            entry["speedup_best_batched_vs_one"] = best["channel_steps_per_s"] / rate
            print(f"   speed-up batched (batch {best['batch']}) / one at a time: "
                  f"{entry['speedup_best_batched_vs_one']:.2f}x")
    if budget.left > 10:
        sae = Sae.random(width, width * args.sae_expansion, k=32, seed=0).to(pipe.unet.device)
        batch = max(args.batch)
        run(batch, 1, sae)
        seconds = run(batch, args.dream_steps, sae)
        rate = batch * args.dream_steps / seconds
        entry["sae_features"] = {"batch": batch, "features": sae.num_latents, "channel_steps_per_s": rate}
        print(f"   SAE features ({sae.num_latents}), batch {batch}: {rate:9.2f} feature-steps/s")
        del sae


def bench_capture(args, pipe, flops: dict, entry: dict) -> None:
    """Hooked generation with CFG: raw spatial mean + a random SAE at the layer, images/s."""
    device = pipe.unet.device
    width = pipe.unet.config.block_out_channels[-2]
    sae = Sae.random(width, width * args.sae_expansion, k=32, seed=0).to(device)
    reducers = {"raw": RawChannels(None).reduce, "sae": TopKSaeBasis(sae).reduce}
    batch = args.image_batch
    time_capture(args, pipe, batch, 2, reducers)  # warm-up
    reset_peak(device)
    seconds = time_capture(args, pipe, batch, args.steps, reducers)
    rate = batch / seconds
    per_image = 2 * args.steps * flops["unet_forward"] + flops["vae_decode"] + 2 * flops["text_encoder"]
    entry.update({"images_per_s": rate, "batch": batch, "denoising_steps": args.steps,
                  "unet_rows_per_step": 2 * batch, "mfu": mfu(per_image, rate, args.peak_tflops),
                  "sae_features": sae.num_latents})
    print(f"   {rate:8.3f} images/s (batch {batch}, {args.steps} steps, CFG, raw + {sae.num_latents}-feature SAE)"
          f"  MFU {entry['mfu']:.1%}")


def bench_priors(args, pipe, flops: dict, entry: dict) -> None:
    """generate_priors: empty prompt, guidance 1, one steered channel per image, images/s."""
    width = pipe.unet.config.block_out_channels[-2]
    channels = list(range(args.image_batch))
    directions = RawChannels(width).directions(channels)
    schedule = torch.full((len(channels), 1000), 5.0)
    generate_priors(pipe, TARGET_LAYER, directions[:1], schedule[:1], [0], num_inference_steps=2, batch_size=1)
    reset_peak(pipe.unet.device)
    synchronize(pipe.unet.device)
    start = time.perf_counter()
    generate_priors(pipe, TARGET_LAYER, directions, schedule, [0], num_inference_steps=args.steps,
                    batch_size=args.image_batch)
    synchronize(pipe.unet.device)
    seconds = time.perf_counter() - start
    rate = len(channels) / seconds
    per_image = args.steps * flops["unet_forward"] + flops["vae_decode"]
    entry.update({"images_per_s": rate, "batch": args.image_batch, "denoising_steps": args.steps,
                  "mfu": mfu(per_image, rate, args.peak_tflops)})
    print(f"   {rate:8.3f} images/s (batch {args.image_batch}, {args.steps} steps, guidance 1)  MFU {entry['mfu']:.1%}")


def bench_truncated(args, pipe, flops: dict, budget: Budget, entry: dict) -> None:
    """Forward to the layer + backward to the latent: hook (raises) vs explicit truncated, eager and compiled."""
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    layer = resolve_layer(unet, TARGET_LAYER)
    parts = TARGET_LAYER.split(".")
    up_block, attention = int(parts[1]), int(parts[3])
    batch = max(args.batch)
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(batch, 4, size, size, generator=generator).to(device)
    timestep = torch.linspace(50, 950, batch).long().to(device)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    if args.channels_last:
        latent = latent.to(memory_format=torch.channels_last)

    def hooked(x: torch.Tensor) -> torch.Tensor:
        return forward_to_layer(unet, layer, x, timestep, context)

    def explicit(x: torch.Tensor) -> torch.Tensor:
        return truncated_forward(unet, up_block, attention, x, timestep, context)

    with torch.no_grad():
        reference = hooked(latent.to(dtype)).float()
        difference = (explicit(latent.to(dtype)).float() - reference).abs().max().item()
    entry["max_abs_difference_explicit_vs_hook"] = difference
    print(f"   explicit truncated forward vs hook: max |difference| {difference:.3e} "
          f"(output {tuple(reference.shape)})")

    def step_time(forward: Callable[[torch.Tensor], torch.Tensor], repeats: int) -> float:
        def once() -> None:
            x = latent.clone().requires_grad_(True)
            out = forward(x.to(dtype))
            torch.autograd.grad(out[:, 0].float().mean(), x)

        once()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            once()
        synchronize(device)
        return (time.perf_counter() - start) / repeats

    repeats = max(2, args.dream_steps // 2)
    per_element = flops["unet_forward_to_layer_plus_backward_to_latent"]
    variants: dict[str, Callable] = {"hook_eager": hooked, "explicit_eager": explicit}
    if args.compile and budget.left < 90:
        entry["compile_error"] = f"not tried: only {budget.left:.0f} s of budget left (compiling needs ~1-2 min)"
        print(f"   torch.compile {entry['compile_error']}")
    elif args.compile:
        compile_start = time.perf_counter()
        try:
            compiled = torch.compile(explicit, fullgraph=True, dynamic=False)
            x = latent.clone().requires_grad_(True)
            torch.autograd.grad(compiled(x.to(dtype))[:, 0].float().mean(), x)
            entry["compile_seconds"] = time.perf_counter() - compile_start
            variants["explicit_compiled_fullgraph"] = compiled
            print(f"   torch.compile(fullgraph=True) of the explicit forward: {entry['compile_seconds']:.1f} s")
        except Exception as error:  # report, do not crash
            entry["compile_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"   torch.compile failed: {entry['compile_error']}")
    rows = {}
    for name, forward in variants.items():
        if budget.left < 5:
            entry["status"] = "partial: budget spent"
            break
        seconds = step_time(forward, repeats)
        rate = batch / seconds
        rows[name] = {"element_steps_per_s": rate, "mfu": mfu(per_element, rate, args.peak_tflops)}
        print(f"   {name:28s}: {rate:9.2f} element fwd+bwd/s (batch {batch})  MFU {rows[name]['mfu']:.1%}")
    entry["forward_backward"] = rows
    if args.compile and budget.left > 30:
        try:  # the hook raises StopForward: Dynamo cannot keep that in one graph
            torch._dynamo.reset()
            with torch.no_grad():
                torch.compile(hooked, fullgraph=True, dynamic=False)(latent.to(dtype))
            entry["hook_fullgraph_compiles"] = True
        except Exception as error:
            entry["hook_fullgraph_compiles"] = False
            print(f"   (expected) the raising hook does not compile as one graph: {type(error).__name__}")


# --------------------------------------------------------------------------------------------------
# --compare: today's path vs the tuned ones (ddr_core.performance), same chip, one run
# --------------------------------------------------------------------------------------------------

# What --compare tries when --tuned is not given (each one in turn, after today's path). GPU: the cheap kernel
# options alone, then regional compile in NHWC with larger batches; CPU (smoke test): no code generation.
DEFAULT_TUNED_GPU = ['{"fuse_qkv": true, "attention": "cudnn"}',
                     '{"channels_last": true, "compile": "blocks", "fuse_qkv": true}']
DEFAULT_TUNED_CPU = ['{"channels_last": true, "fuse_qkv": true}',
                     '{"compile": "blocks", "compile_backend": "aot_eager"}']
TARGET_MFU = {"dreams": 0.35, "capture": 0.30}  # issue #19 item 5


def time_dreams(args, pipe, batch: int, steps: int) -> float:
    """Seconds of ``optimise_dreams`` for ``batch`` raw-channel elements and ``steps`` steps (as bench_dreams)."""
    layer = resolve_layer(pipe.unet, TARGET_LAYER)
    size = pipe.unet.config.sample_size
    width = 1280 if not args.quick else pipe.unet.config.block_out_channels[-2]
    config = DreamConfig(num_steps=steps, snapshot_every=0, use_prior=False, n_results=1, seeds=[0],
                         dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype])
    channels = [(7 * i) % width for i in range(batch)]
    timesteps = [int(50 + (900 * i) // max(batch - 1, 1)) for i in range(batch)]
    init = torch.cat([torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(i)) for i in range(batch)])
    generators = element_generators([element_seed(0, c, t, 0) for c, t in zip(channels, timesteps, strict=True)])
    synchronize(pipe.unet.device)
    start = time.perf_counter()
    optimise_dreams(pipe, layer, DreamObjective(torch.tensor(channels), RawChannels(None)), init, timesteps, config,
                    generators)
    synchronize(pipe.unet.device)
    return time.perf_counter() - start


def time_capture(args, pipe, batch: int, steps: int, reducers: dict, host_copies: str = "per_batch",
                 keep: list | None = None) -> float:
    """Seconds of one hooked CFG generation of ``batch`` images (bench_capture and bench_compare time with it).

    ``host_copies``: how the recording reaches the CPU (:class:`ddr_core.hooks.HostCopies`: ``per_batch``, the
    platform's default, or ``per_step``, the path before issue #19). ``keep``: the recording is appended to it."""
    device = pipe.unet.device
    layer = resolve_layer(pipe.unet, TARGET_LAYER)
    prompts = [TINY_PROMPTS[i % len(TINY_PROMPTS)] for i in range(batch)]
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = as_model(pipe).initial_latents(list(range(batch)), side, side, dtype=pipe.unet.dtype, device=device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), TimestepTracker(pipe.unet) as tracker, \
            capture_activations(layer, tracker, reducers, cfg=True, host_copies=host_copies) as recording:
        pipe(prompt=prompts, latents=latents, num_inference_steps=steps, output_type="pil")
    synchronize(device)
    seconds = time.perf_counter() - start
    if keep is not None:
        keep.append(recording)
    return seconds


def count_syncs(device: torch.device, run: Callable[[], Any]) -> int | None:
    """Host-device synchronisations during ``run()`` (CUDA's sync debug mode, one warning each); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


HOST_COPY_ROUNDS = 2  # per_step and per_batch alternate this many times (drift of clocks and allocator cancels)


def bench_host_copies(args, pipe, flops: dict, reducers: dict, budget: Budget, entry: dict) -> None:
    """Capture with the recording's per-step copies to the CPU (the path before issue #19) vs one copy per batch
    (today's default), eager, ``--image-batch``, alternating; images/s, the ratio, whether the recorded values are
    identical on this device, and (CUDA) the host-device syncs of a 2-step generation on each path."""
    device = pipe.unet.device
    batch = args.image_batch
    per_image = 2 * args.steps * flops["unet_forward"] + flops["vae_decode"] + 2 * flops["text_encoder"]
    seconds: dict[str, list[float]] = {"per_step": [], "per_batch": []}
    recordings: dict[str, list] = {"per_step": [], "per_batch": []}
    for mode in seconds:  # warm-up (and the values compared below, 2 steps)
        time_capture(args, pipe, batch, 2, reducers, mode, keep=recordings[mode])
    same = all(torch.equal(a, b) for half in ("conditional", "unconditional")
               for a, b in zip(getattr(recordings["per_step"][0], half).values(),
                               getattr(recordings["per_batch"][0], half).values(), strict=True))
    syncs = {mode: count_syncs(device, lambda mode=mode: time_capture(args, pipe, batch, 2, reducers, mode))
             for mode in seconds}
    for _ in range(HOST_COPY_ROUNDS):
        for mode in seconds:
            if budget.left < 15:
                entry["status"] = "partial: budget spent"
                break
            reset_peak(device)
            seconds[mode].append(time_capture(args, pipe, batch, args.steps, reducers, mode))
    rows = {}
    for mode, values in seconds.items():
        if values:
            rate = batch / min(values)  # the best round of each (least disturbed)
            rows[mode] = {"images_per_s": rate, "rate": rate, "mfu": mfu(per_image, rate, args.peak_tflops),
                          "rounds_seconds": values, "syncs_2_steps": syncs[mode],
                          "peak_memory_gib": peak_memory_gib(device)}
    if "per_step" in rows and "per_batch" in rows:
        rows["per_batch"]["ratio_to_per_step"] = rows["per_batch"]["rate"] / rows["per_step"]["rate"]
    entry.update({"batch": batch, "steps": args.steps, "same_values": same, "paths": rows})
    for mode, row in rows.items():
        print(f"      host copies {mode:9s}: {row['rate']:9.3f} images/s  MFU {row['mfu']:.1%}  syncs in 2 steps "
              f"{row['syncs_2_steps'] if row['syncs_2_steps'] is not None else 'n/a (not CUDA)'}", flush=True)
    print(f"      recorded values identical on {device.type}: {same}")


def bench_compare(args, pipe, flops: dict, budget: Budget, entry: dict) -> None:
    """Dreams (channel-steps/s) and capture (images/s) on today's path (eager, ``--batch`` max,
    ``--image-batch``) and on each ``--tuned`` path (its options, ``--tuned-batch``, ``--tuned-image-batch``),
    one after the other on this device; ratios against today's path."""
    from ddr_core.performance import PerformanceConfig, performance_config, tuned_denoiser

    device = pipe.unet.device
    width = pipe.unet.config.block_out_channels[-2]
    sae = Sae.random(width, width * args.sae_expansion, k=32, seed=0).to(device)
    reducers = {"raw": RawChannels(None).reduce, "sae": TopKSaeBasis(sae).reduce}
    per_dream_step = flops["unet_forward_to_layer_plus_backward_to_latent"]
    per_image = 2 * args.steps * flops["unet_forward"] + flops["vae_decode"] + 2 * flops["text_encoder"]
    copies = entry["host_copies"] = {}
    print(f"   host copies: per_step (before issue #19) vs per_batch (today), eager, capture batch {args.image_batch}",
          flush=True)
    try:
        bench_host_copies(args, pipe, flops, reducers, budget, copies)
        copies.setdefault("status", "ok")
    except Exception as error:  # must not lose the other paths' numbers
        copies["status"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"      host copies: {copies['status']}")
        traceback.print_exc(limit=3)
    paths = [("today", PerformanceConfig(), max(args.batch), args.image_batch)]
    paths += [(f"tuned{i + 1}", performance_config(json.loads(text)), args.tuned_batch, args.tuned_image_batch)
              for i, text in enumerate(args.tuned)]
    rows: dict[str, dict[str, Any]] = {}
    for name, config, dream_batch, image_batch in paths:
        row = rows[name] = {"performance": config.model_dump(exclude_defaults=True), "dream_batch": dream_batch,
                            "image_batch": image_batch}
        print(f"   {name}: {config.describe()}; dreams batch {dream_batch}, capture batch {image_batch}", flush=True)
        for what in ("dreams", "capture"):
            if budget.left < 20:
                row[what] = {"status": f"skipped: budget spent ({budget.spent:.0f} s)"}
                print(f"      {what}: {row[what]['status']}")
                continue
            try:
                with tuned_denoiser(pipe.unet, config, hooked=resolve_layer(pipe.unet, TARGET_LAYER)):
                    start = time.perf_counter()  # warm-up: compiles, kernel selection, allocator
                    if what == "dreams":
                        time_dreams(args, pipe, dream_batch, 1)
                    else:
                        time_capture(args, pipe, image_batch, 2, reducers)
                    warm = time.perf_counter() - start
                    reset_peak(device)
                    if what == "dreams":
                        rate = dream_batch * args.dream_steps / time_dreams(args, pipe, dream_batch, args.dream_steps)
                        result = {"channel_steps_per_s": rate, "mfu": mfu(per_dream_step, rate, args.peak_tflops)}
                    else:
                        rate = image_batch / time_capture(args, pipe, image_batch, args.steps, reducers)
                        result = {"images_per_s": rate, "mfu": mfu(per_image, rate, args.peak_tflops)}
                row[what] = {**result, "rate": rate, "warmup_seconds": warm,
                             "peak_memory_gib": peak_memory_gib(device), "status": "ok"}
                print(f"      {what}: {rate:9.3f} {'channel-steps' if what == 'dreams' else 'images'}/s  "
                      f"MFU {result['mfu']:.1%}  peak {row[what]['peak_memory_gib']:.2f} GiB  (warm-up {warm:.1f} s)",
                      flush=True)
            except Exception as error:  # a tuned path failing must not lose the others' numbers
                row[what] = {"status": f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
                print(f"      {what}: {row[what]['status']}")
                traceback.print_exc(limit=3)
    today = rows["today"]
    for row in rows.values():
        for what in ("dreams", "capture"):
            mine, base = row.get(what, {}), today.get(what, {})
            if "rate" in mine and "rate" in base:
                mine["ratio_to_today"] = mine["rate"] / base["rate"]
            if "mfu" in mine:
                mine["meets_target"] = mine["mfu"] >= TARGET_MFU[what]
    entry["paths"] = rows
    entry["target_mfu"] = TARGET_MFU


def compare_lines(entry: dict) -> list[str]:
    """The --compare table: the host-copy rows (capture), then one line per path and stage, with the ratio to
    today's path."""
    lines = []
    copies = entry.get("host_copies", {})
    for mode, row in copies.get("paths", {}).items():
        syncs = row["syncs_2_steps"]
        lines.append(
            f"copies  capture : {row['rate']:9.3f} images/s (batch {copies['batch']}), MFU {row['mfu']:.1%}, "
            f"host_copies={mode}" + (" (before issue #19)" if mode == "per_step" else
                                     f" x{row.get('ratio_to_per_step', float('nan')):.3f} vs per_step")
            + f", syncs in a 2-step generation {syncs if syncs is not None else 'n/a'}"
            + f", values identical: {copies.get('same_values')}")
    if copies and "paths" not in copies:
        lines.append(f"copies  capture : {copies.get('status', 'not run')}")
    for name, row in entry.get("paths", {}).items():
        for what in ("dreams", "capture"):
            cell = row.get(what, {})
            if "rate" not in cell:
                lines.append(f"{name:7s} {what:8s}: {cell.get('status', 'not run')}")
                continue
            unit = "channel-steps/s" if what == "dreams" else "images/s"
            options = ", ".join(f"{k}={v}" for k, v in row["performance"].items()) or "plain eager"
            batch = row["dream_batch"] if what == "dreams" else row["image_batch"]
            lines.append(
                f"{name:7s} {what:8s}: {cell['rate']:9.3f} {unit} (batch {batch}), MFU {cell['mfu']:.1%} "
                f"(target {TARGET_MFU[what]:.0%}: {'met' if cell['meets_target'] else 'not met'}), "
                f"x{cell.get('ratio_to_today', float('nan')):.2f} vs today, peak {cell['peak_memory_gib']:.1f} GiB, "
                f"warm-up {cell['warmup_seconds']:.0f} s [{options}]")
    return lines


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="dream batch sizes, comma-separated (default 8,32,64; --quick 2,4)")
    parser.add_argument("--image-batch", type=int, default=None, help="images per capture/prior batch (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps of capture and priors (default 50)")
    parser.add_argument("--dream-steps", type=int, default=None, help="optimisation steps timed (default 10)")
    parser.add_argument("--sae-expansion", type=int, default=16, help="random SAE features = layer width x this")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="accelerator peak for --dtype in TFLOP/s (default 989: H100 SXM dense BF16/FP16)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting sections after this")
    parser.add_argument("--quick", action="store_true", help="toy widths and few steps: a CPU smoke test")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the truncated forward")
    parser.add_argument("--channels-last", action="store_true", help="UNet/VAE in channels_last memory format")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs (meta device) and exit")
    parser.add_argument("--compare", action="store_true",
                        help="only today's path vs each --tuned path (dreams + capture, same device, one run) "
                             "with ratios; skips the other sections")
    parser.add_argument("--tuned", action="append", default=None, metavar="JSON",
                        help="a ddr_core.performance.PerformanceConfig as JSON, repeatable (default: two; see "
                             "DEFAULT_TUNED_GPU / DEFAULT_TUNED_CPU)")
    parser.add_argument("--tuned-batch", type=int, default=None,
                        help="dream batch of the tuned paths (default 128; --quick 4)")
    parser.add_argument("--tuned-image-batch", type=int, default=None,
                        help="capture images per batch of the tuned paths (default 32; --quick 4)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch = args.batch or ([2, 4] if quick else [8, 32, 64])
    args.image_batch = args.image_batch or (2 if quick else 8)
    args.steps = args.steps or (3 if quick else 50)
    args.dream_steps = args.dream_steps or (2 if quick else 10)
    if quick:
        args.sae_expansion = min(args.sae_expansion, 4)
    if args.tuned_batch is None:
        args.tuned_batch = 4 if quick else 128
    if args.tuned_image_batch is None:
        args.tuned_image_batch = 4 if quick else 32
    for name in ("batch", "tuned_batch", "image_batch", "tuned_image_batch", "steps", "dream_steps"):
        values = getattr(args, name) if isinstance(getattr(args, name), list) else [getattr(args, name)]
        if any(v < 1 for v in values):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tuned is None:
        args.tuned = DEFAULT_TUNED_CPU if args.device.startswith("cpu") else DEFAULT_TUNED_GPU
    from ddr_core.performance import performance_config

    for text in args.tuned:  # checked here, before minutes of model building
        try:
            performance_config(json.loads(text))
        except ValueError as error:  # json.JSONDecodeError and pydantic's ValidationError are ValueErrors
            parser.error(f"--tuned {text!r}: {error}")
    return args


def _summary_lines(results: dict[str, Any]) -> list[str]:
    s, f = results["sections"], results.get("flops", {})
    lines = [
        f"bench_gpu: {results['device_name']} | {results['dtype']} | torch {results['torch']} | "
        f"{'QUICK (toy model, numbers meaningless)' if results['quick'] else 'SD v1.4 UNet, random weights'} | "
        f"channels_last={results['channels_last']} | peak {results['peak_tflops']:.0f} TFLOP/s assumed",
        f"UNet parameters: {results.get('unet_parameters', 0) / 1e6:.2f} M; layer {TARGET_LAYER} output "
        f"{f.get('layer_output_shape')}",
    ]
    if f:
        lines.append(
            f"FLOPs/element: full UNet fwd {f['unet_forward'] / 1e9:.1f} G | fwd to layer "
            f"{f['unet_forward_to_layer'] / 1e9:.1f} G ({f['stopped_share']:.1%}) | fwd to layer + bwd to latent "
            f"{f['unet_forward_to_layer_plus_backward_to_latent'] / 1e9:.1f} G | VAE decode "
            f"{f['vae_decode'] / 1e9:.1f} G | text {f['text_encoder'] / 1e9:.2f} G")
    dreams = s.get("dreams", {})
    for row in dreams.get("batched", []):
        lines.append(f"dreams batch {row['batch']:3d}: {row['channel_steps_per_s']:.2f} channel-steps/s, "
                     f"MFU {row['mfu']:.1%}, peak {row['peak_memory_gib']:.2f} GiB")
    if "one_at_a_time" in dreams:
        one = dreams["one_at_a_time"]
        lines.append(f"dreams one at a time: {one['channel_steps_per_s']:.2f} channel-steps/s, MFU {one['mfu']:.1%}"
                     + (f"; batched speed-up {dreams['speedup_best_batched_vs_one']:.2f}x"
                        if "speedup_best_batched_vs_one" in dreams else ""))
    if "sae_features" in dreams:
        lines.append(f"dreams SAE features: {dreams['sae_features']['channel_steps_per_s']:.2f} feature-steps/s")
    for name in ("capture", "priors"):
        entry = s.get(name, {})
        if "images_per_s" in entry:
            lines.append(f"{name}: {entry['images_per_s']:.3f} images/s ({entry['denoising_steps']} steps, batch "
                         f"{entry['batch']}), MFU {entry['mfu']:.1%}, peak {entry['peak_memory_gib']:.2f} GiB")
    lines.extend(compare_lines(s.get("compare", {})))
    truncated = s.get("truncated_forward", {})
    for name, row in truncated.get("forward_backward", {}).items():
        lines.append(f"fwd+bwd {name}: {row['element_steps_per_s']:.2f} elements/s, MFU {row['mfu']:.1%}")
    if "compile_error" in truncated:
        lines.append(f"torch.compile failed: {truncated['compile_error']}")
    for name, entry in s.items():
        status = entry.get("status", "")
        lines.append(f"section {name}: {status} ({entry.get('seconds', 0)} s)")
    lines.append(f"total {results['seconds']:.0f} s of budget {results['budget_s']:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu --quick for a smoke test")
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": args.dtype, "torch": torch.__version__, "quick": args.quick, "channels_last": args.channels_last,
        "peak_tflops": args.peak_tflops, "budget_s": args.budget_s, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "sections": {},
    }
    print(f"device {results['device_name']}, dtype {args.dtype}, torch {torch.__version__}; "
          f"MFU assumes a peak of {args.peak_tflops:.0f} TFLOP/s (--peak-tflops)")
    unet_config = QUICK_UNET_CONFIG if args.quick else SD14_UNET_CONFIG
    vae_config = QUICK_VAE_CONFIG if args.quick else SD_VAE_CONFIG
    text = QUICK_TEXT if args.quick else SD_TEXT

    with section("flops", results, budget, device) as entry:
        check = attention_counting_check(device, dtype if device.type == "cuda" else torch.float32)
        entry["attention_check"] = check
        print(f"   SDPA counted on {device.type}: {check['counted_forward']:,} vs expected {check['expected_forward']:,}"
              f" ({'ok' if check['ok'] else 'NOT COUNTED'}); formulas registered here: "
              f"{check['formulas_registered_here'] or 'none needed'}")
        flops = count_flops(args, unet_config, vae_config, text)
        results["flops"] = flops
        results["unet_parameters"] = flops["unet_parameters"]
        print(f"   UNet parameters {flops['unet_parameters']:,}; layer output {flops['layer_output_shape']}")
        print(f"   per element: full forward {flops['unet_forward'] / 1e9:.1f} GFLOP, to layer "
              f"{flops['unet_forward_to_layer'] / 1e9:.1f} GFLOP ({flops['stopped_share']:.1%}), to layer + backward "
              f"to latent {flops['unet_forward_to_layer_plus_backward_to_latent'] / 1e9:.1f} GFLOP, VAE decode "
              f"{flops['vae_decode'] / 1e9:.1f} GFLOP, text encoder {flops['text_encoder'] / 1e9:.2f} GFLOP")
        attention = sum(flops["unet_forward_attention_ops"].values())
        print(f"   attention (SDPA / bmm) in the full forward: {attention / 1e9:.1f} GFLOP "
              f"{flops['unet_forward_attention_ops']}")
        if not args.quick and flops["unet_parameters"] != SD14_UNET_PARAMETERS:
            raise AssertionError(f"UNet has {flops['unet_parameters']:,} parameters, SD v1.4 has "
                                 f"{SD14_UNET_PARAMETERS:,}: the config is wrong")

    if args.flops_only:
        results["seconds"] = budget.spent
        _finish(results, args)
        return results

    pipe = None
    with tempfile.TemporaryDirectory() as tmp, section("setup", results, budget, device, need_s=-1e9) as entry:
        start = time.perf_counter()
        pipe, *_ = build_pipeline(args, device, dtype, Path(tmp) / "tokenizer")
        entry["build_seconds"] = time.perf_counter() - start
        parameters = count_parameters(pipe.unet)
        results["unet_parameters"] = parameters
        entry.update({"unet_parameters": parameters, "vae_parameters": count_parameters(pipe.vae),
                      "text_encoder_parameters": count_parameters(pipe.text_encoder)})
        print(f"   built in {entry['build_seconds']:.1f} s: UNet {parameters / 1e6:.2f} M, VAE "
              f"{entry['vae_parameters'] / 1e6:.1f} M, text encoder {entry['text_encoder_parameters'] / 1e6:.1f} M "
              f"parameters (all random)")
        if not args.quick and parameters != SD14_UNET_PARAMETERS:
            raise AssertionError(f"UNet has {parameters:,} parameters, SD v1.4 has {SD14_UNET_PARAMETERS:,}")
    if pipe is None:
        results["seconds"] = budget.spent
        _finish(results, args)
        return results

    flops = results.get("flops")
    if flops is None:
        raise SystemExit("FLOP counting failed; see above")
    if args.compare:
        with section("compare", results, budget, device, need_s=10) as entry:
            if entry is not None:
                bench_compare(args, pipe, flops, budget, entry)
        results["seconds"] = budget.spent
        _finish(results, args)
        return results
    with section("dreams", results, budget, device, need_s=10) as entry:
        if entry is not None:
            bench_dreams(args, pipe, args.dtype, flops, budget, entry)
    with section("capture", results, budget, device, need_s=10) as entry:
        if entry is not None:
            bench_capture(args, pipe, flops, entry)
    with section("priors", results, budget, device, need_s=10) as entry:
        if entry is not None:
            bench_priors(args, pipe, flops, entry)
    with section("truncated_forward", results, budget, device, need_s=10) as entry:
        if entry is not None:
            bench_truncated(args, pipe, flops, budget, entry)
    results["seconds"] = budget.spent
    _finish(results, args)
    return results


def _finish(results: dict[str, Any], args: argparse.Namespace) -> None:
    lines = _summary_lines(results)
    print("\n---- summary (paste into BENCHMARKS.md) ----")
    print("```")
    print("\n".join(lines))
    print("```")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=lambda v: None if isinstance(v, float)
                                       and not math.isfinite(v) else str(v)))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
