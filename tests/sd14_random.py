"""A diffusers folder of the Stable Diffusion v1.4 architecture with random weights, and a SAeUron-shaped SAE.

What docs/GUIDE_SD14.md is tested on (tests/test_guide_sd14.py): the real weights cannot be downloaded or run
here, so the folder has SD v1.4's UNet, VAE and text-encoder shapes (the configs of
``benchmarks/bench_gpu.py``: 859.52 M UNet parameters, ``up_blocks.1.attentions.1`` of 1280 channels) with
seeded random weights, stored as float16 safetensors (half the disk; stages load them at the dtype they ask).
The tokenizer is the project's small word-level tokenizer over the given prompts' words, not CLIP's 49,408-token
BPE vocabulary (not available offline); the text encoder is CLIP-shaped over that vocabulary.
The SAE has SAeUron's layout and size (``unet.up_blocks.1.attentions.1/``: cfg.json + sae.safetensors,
1280 -> 20480 features, top-k 32), random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAEURON_WIDTH = 20480
SAEURON_K = 32


def _bench_gpu():
    from tests.benchmark_scripts import load_benchmark

    return load_benchmark("bench_gpu")


def build_sd14_random(out_dir: Path, prompts: list[str], seed: int = 0) -> Path:
    """Write a ``StableDiffusionPipeline`` folder of SD v1.4's architecture (random weights) to ``out_dir``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddr_core.tiny_model import build_sd_scheduler
    from ddr_core.tokenizer import build_word_tokenizer, prompt_words

    bench = _bench_gpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    words = prompt_words(prompts)
    tokenizer = build_word_tokenizer(words, out_dir / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**bench.SD14_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == bench.SD14_UNET_PARAMETERS
    vae = AutoencoderKL(**bench.SD_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        projection_dim=bench.SD_TEXT["hidden_size"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **bench.SD_TEXT,
    ))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    build_word_tokenizer(words, out_dir / "tokenizer")  # save_pretrained rewrote it through transformers
    return out_dir


def build_saeuron_random(out_root: Path, d_in: int = 1280, seed: int = 0) -> Path:
    """A random SAE in SAeUron's layout and size under ``out_root/unet.up_blocks.1.attentions.1/``."""
    from ddr_core.sae import Sae, save_sae

    torch.manual_seed(seed)
    sae = Sae.random(d_in=d_in, num_latents=SAEURON_WIDTH, k=SAEURON_K, seed=seed)
    return Path(save_sae(sae, out_root / "unet.up_blocks.1.attentions.1"))


def write_prompts(path: Path, prompts: list[str]) -> Path:
    """UnlearnCanvas-style metadata: JSON Lines with a ``text`` field."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts), encoding="utf-8")
    return path
