"""The embedded tiny Stable-Diffusion-shaped model: layout, determinism, speed-relevant shape."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ddr_core.families.sd import unet_layer_width
from ddr_core.pipeline import resolve_layer
from ddr_core.tiny_model import (
    TINY_PROMPTS,
    TINY_TARGET_LAYER,
    TinyModelConfig,
    build_tiny_pipeline,
    build_tiny_sae,
    write_builtin_prompts,
)


def _hashes(folder: Path, pattern: str) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob(pattern))
    }


def test_prompts_are_unique_short_and_cover_the_grid():
    assert len(TINY_PROMPTS) == 32 == len(set(TINY_PROMPTS))
    assert "a red circle on a black background" in TINY_PROMPTS
    assert all(len(prompt.split()) == 7 for prompt in TINY_PROMPTS)


def test_folder_layout(tiny_model_dir: Path):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for component in ("unet", "vae", "text_encoder"):
        assert list((tiny_model_dir / component).glob("*.safetensors")), component
        assert not list((tiny_model_dir / component).glob("*.bin")), component
    scheduler = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler["num_train_timesteps"] == 1000 and scheduler["beta_schedule"] == "scaled_linear"
    assert scheduler["set_alpha_to_one"] is False and scheduler["steps_offset"] == 1


def test_loaded_components_match_sd_naming(tiny_pipe):
    config = TinyModelConfig()
    assert tiny_pipe.vae_scale_factor == 8
    assert tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor == config.image_size
    assert tiny_pipe.text_encoder.config.vocab_size == len(tiny_pipe.tokenizer)
    assert tiny_pipe.text_encoder.config.max_position_embeddings == 77
    assert tiny_pipe.unet.config.cross_attention_dim == tiny_pipe.text_encoder.config.hidden_size
    resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    assert unet_layer_width(tiny_pipe.unet, TINY_TARGET_LAYER) == config.unet_block_out_channels[-2] == 64
    assert tiny_pipe.safety_checker is None


def test_build_is_byte_identical_and_seed_sensitive(tiny_model_dir: Path, tmp_path: Path):
    again = build_tiny_pipeline(tmp_path / "again")
    reference = _hashes(tiny_model_dir, "*.safetensors")
    assert len(reference) == 3
    assert _hashes(again, "*.safetensors") == reference
    assert _hashes(again, "tokenizer/*") == _hashes(tiny_model_dir, "tokenizer/*")
    other = build_tiny_pipeline(tmp_path / "other", TinyModelConfig(seed=1))
    other_hashes = _hashes(other, "*.safetensors")
    assert all(other_hashes[name] != digest for name, digest in reference.items())


def test_build_does_not_touch_the_global_rng(tmp_path: Path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sae(tmp_path, d_in=8, expansion_factor=2, k=2)
    build_tiny_pipeline(tmp_path / "model")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_sae_folder(tiny_sae_dir: Path, tmp_path: Path):
    from ddr_core.sae import load_sae

    assert tiny_sae_dir.name == f"unet.{TINY_TARGET_LAYER}"
    sae = load_sae(tiny_sae_dir, expected_d_in=64)
    assert sae.cfg.d_in == 64 and sae.cfg.num_latents == 256 and sae.cfg.k == 8
    again = build_tiny_sae(tmp_path)
    assert _hashes(again, "*") == _hashes(tiny_sae_dir, "*")


def test_write_builtin_prompts(tmp_path: Path):
    path = write_builtin_prompts(tmp_path / "sub" / "prompts.jsonl")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"text": prompt} for prompt in TINY_PROMPTS]


def test_generates_finite_images_of_the_configured_size(tiny_pipe):
    generator = torch.Generator().manual_seed(0)
    output = tiny_pipe(
        list(TINY_PROMPTS[:2]),
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=generator,
        output_type="np",
    )
    assert output.images.shape == (2, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(output.images)).all()
