"""The SDXL family (ddr_core/families/sdxl.py), the sdxl-unbox SAE format, residual hook points and Turbo
semantics (no CFG, 1-4 steps), on the tiny random SDXL folders built offline."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
import torch

from ddr_core.families import family_of_folder, load_model
from ddr_core.families.sdxl import (
    SDXL_UNBOX_LAYERS,
    TINY_SDXL_TARGET_LAYER,
    StableDiffusionXLFamily,
    build_tiny_sdxl_pipeline,
    build_tiny_sdxl_sae,
    build_tiny_sdxl_turbo_pipeline,
)
from ddr_core.sae import SaeFormatError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="module")
def turbo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl_turbo_pipeline(tmp_path_factory.mktemp("tiny_sdxl_turbo") / "model")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir: Path) -> StableDiffusionXLFamily:
    return load_model(sdxl_dir)


@pytest.fixture(scope="module")
def turbo(turbo_dir: Path) -> StableDiffusionXLFamily:
    return load_model(turbo_dir)


# ------------------------------------------------------------------------------------------------ family


def test_the_tiny_folder_is_sdxl_with_both_text_encoders(sdxl_dir: Path, sdxl: StableDiffusionXLFamily) -> None:
    assert family_of_folder(sdxl_dir) is StableDiffusionXLFamily
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"][1] == "CLIPTextModel" and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    assert not list(sdxl_dir.rglob("*.bin")) and list(sdxl_dir.rglob("*.safetensors"))
    assert sdxl.denoiser.config.addition_embed_type == "text_time"
    assert sdxl.default_size == (64, 64) and sdxl.latent_shape(64, 64) == (4, 8, 8)


def test_conditioning_holds_token_and_pooled_embeddings(sdxl: StableDiffusionXLFamily) -> None:
    conditioning = sdxl.encode_prompt("a red circle")
    cross = sdxl.denoiser.config.cross_attention_dim
    assert conditioning["prompt_embeds"].shape == (1, 77, cross) == (1, 77, 32)
    assert conditioning["pooled_prompt_embeds"].shape == (1, sdxl.pooled_dim) == (1, 16)
    other = sdxl.encode_prompt("a blue star")
    assert not torch.equal(conditioning["pooled_prompt_embeds"], other["pooled_prompt_embeds"])
    time_ids = sdxl.add_time_ids(64, 48, batch=3)
    assert time_ids.shape == (3, 6) and time_ids[0].tolist() == [64, 48, 0, 0, 64, 48]


def test_layer_widths_and_the_sdxl_unbox_blocks_exist(sdxl: StableDiffusionXLFamily) -> None:
    for layer in SDXL_UNBOX_LAYERS:
        assert sdxl.layer_width(layer) == 32, layer
    assert sdxl.layer_width("down_blocks.1.attentions.0") == 32
    assert sdxl.layer_width("up_blocks.1.attentions.0") == 32
    assert sdxl.layer_width("down_blocks.0.resnets.0") == 16


def test_hook_points_read_the_output_or_the_residual_update(sdxl: StableDiffusionXLFamily) -> None:
    from ddr_core.hooks import HookPoint

    sample = sdxl.initial_latents([3], 64, 64)
    timesteps = torch.tensor([500])
    conditioning = sdxl.encode_prompt("a red circle")
    seen: dict[str, torch.Tensor] = {}
    module = sdxl.resolve_layer(TINY_SDXL_TARGET_LAYER)
    handle = module.register_forward_hook(
        lambda _m, args, output: seen.update(input=args[0].detach(), output=output[0].detach()))
    with torch.no_grad():
        residual = sdxl.forward_to_layer(sdxl.hook_point(TINY_SDXL_TARGET_LAYER, "residual"), sample, timesteps,
                                         conditioning)
        output = sdxl.forward_to_layer(sdxl.hook_point(TINY_SDXL_TARGET_LAYER), sample, timesteps, conditioning)
    handle.remove()
    torch.testing.assert_close(output, seen["output"])
    torch.testing.assert_close(residual, seen["output"] - seen["input"])
    assert not torch.allclose(residual, output)
    chosen = sdxl.read_layer_as(TINY_SDXL_TARGET_LAYER, "residual").hook_point(TINY_SDXL_TARGET_LAYER)
    assert chosen.read is sdxl.hook_point(TINY_SDXL_TARGET_LAYER, "residual").read
    assert isinstance(chosen, HookPoint) and chosen.module is module
    sdxl.layer_hooks.clear()
    with pytest.raises(ValueError, match="unknown hook 'input'"):
        sdxl.read_layer_as(TINY_SDXL_TARGET_LAYER, "input")


def test_steering_the_residual_update_adds_to_the_block_output(sdxl: StableDiffusionXLFamily) -> None:
    from ddr_core.hooks import steer_layer

    point = sdxl.hook_point(TINY_SDXL_TARGET_LAYER, "residual")
    direction = torch.zeros(1, 32)
    direction[0, 5] = 1.0
    sample, timesteps = sdxl.initial_latents([4], 64, 64), torch.tensor([300])
    conditioning = sdxl.encode_prompt("")
    plain = sdxl.hook_point(TINY_SDXL_TARGET_LAYER)
    with torch.no_grad():
        before = sdxl.forward_to_layer(plain, sample, timesteps, conditioning)
        with sdxl.track_timesteps() as tracker, steer_layer(point, tracker, direction, lambda t: torch.tensor([2.0])):
            after = sdxl.forward_to_layer(plain, sample, timesteps, conditioning)
    difference = after - before
    assert torch.allclose(difference[:, 5], torch.full_like(difference[:, 5], 2.0), atol=1e-5)
    assert difference[:, :5].abs().max() < 1e-5


def test_add_noise_is_the_unet_input_at_every_integer_timestep(sdxl: StableDiffusionXLFamily) -> None:
    clean, noise = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    alphas = sdxl.pipe.scheduler.alphas_cumprod
    noised = sdxl.add_noise(clean, noise, torch.tensor([0, 777]))  # 777 is on no inference schedule
    assert torch.allclose(noised[1], torch.full_like(noised[1], float(alphas[777].sqrt())))
    # equals the Euler pipeline's scaled model input x + sigma n, divided by sqrt(sigma^2 + 1)
    sigma = ((1 - alphas[777]) / alphas[777]).sqrt()
    noise = torch.randn(1, 4, 8, 8)
    expected = (clean[:1] + sigma * noise) / (sigma**2 + 1).sqrt()
    torch.testing.assert_close(sdxl.add_noise(clean[:1], noise, torch.tensor([777])), expected, atol=1e-5, rtol=1e-5)


def test_generate_with_cfg_and_from_a_conditioning(sdxl: StableDiffusionXLFamily) -> None:
    latents = sdxl.initial_latents([1, 2], 64, 64)
    with sdxl.track_timesteps() as tracker:
        images = sdxl.generate(latents=latents, height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
                               prompts=["a red circle", "a blue star"])
    assert len(images) == 2 and images[0].size == (64, 64) and tracker.history == sdxl.scheduler_timesteps(2)
    conditioning = sdxl.encode_prompt("a red circle").repeat(2)
    final = sdxl.generate(latents=latents, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                          conditioning=conditioning, output_type="latent")
    assert final.shape == (2, 4, 8, 8) and torch.isfinite(final).all()
    assert sdxl.uses_cfg(5.0) and not sdxl.uses_cfg(0.0)


def test_turbo_generates_in_one_step_without_cfg(turbo: StableDiffusionXLFamily) -> None:
    from ddr_core.hooks import capture_activations

    assert type(turbo.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert turbo.scheduler_timesteps(1) == [999] and turbo.scheduler_timesteps(4) == [999, 749, 499, 249]
    latents = turbo.initial_latents([1, 2, 3], 64, 64)
    point = turbo.hook_point(TINY_SDXL_TARGET_LAYER)
    with turbo.track_timesteps() as tracker, capture_activations(
            point, tracker, {"raw": lambda tokens: tokens.mean(1)}, cfg=turbo.uses_cfg(0.0)) as recording:
        images = turbo.generate(latents=latents, height=64, width=64, num_inference_steps=1, guidance_scale=0.0,
                                prompts=["a red circle"] * 3)
    assert len(images) == 3 and tracker.history == [999] and recording.timesteps == [999]
    assert recording.conditional["raw"].shape == (1, 3, 32) and recording.unconditional is None


def test_a_folder_without_the_second_text_encoder_is_refused_by_name(sdxl_dir: Path, tmp_path: Path) -> None:
    import shutil

    from ddr_core.pipeline import ModelFolderError

    folder = Path(shutil.copytree(sdxl_dir, tmp_path / "model"))
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="missing the component folder 'text_encoder_2'"):
        load_model(folder)


def test_a_folder_of_fp16_weights_loads_as_the_fp16_variant(sdxl: StableDiffusionXLFamily, tmp_path: Path) -> None:
    """stabilityai/sdxl-turbo is provisioned with its *.fp16.safetensors files only (config/ddr.yaml)."""
    sdxl.pipe.save_pretrained(tmp_path / "fp16", safe_serialization=True, variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model = load_model(tmp_path / "fp16")
    for name, parameter in model.denoiser.named_parameters():
        torch.testing.assert_close(parameter, sdxl.denoiser.get_parameter(name))


def test_the_tiny_sdxl_builders_are_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.process_time()  # CPU seconds: a busy machine does not inflate them (tests/timing.py)
    first = build_tiny_sdxl_pipeline(tmp_path / "a")
    assert time.process_time() - start < 60
    second = build_tiny_sdxl_pipeline(tmp_path / "b")
    for path in sorted(first.rglob("*.safetensors")):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path


# ------------------------------------------------------------------------------------------ sdxl-unbox SAEs


def _their_layout(root: Path, layer: str, d_model: int = 32, n_dirs: int = 64, k: int = 4, seed: int = 0) -> Path:
    """An SAE written as sdxl-unbox's ``SparseAutoencoder.save_to_disk`` writes it: ``config.json`` and
    ``torch.save({"state_dict": state_dict})`` (an OrderedDict, the non-persistent counter buffer included)."""
    from collections import OrderedDict

    generator = torch.Generator().manual_seed(seed)
    encoder = torch.randn(n_dirs, d_model, generator=generator)
    decoder = encoder.T.clone()
    decoder /= decoder.norm(dim=0)
    state = OrderedDict([
        ("pre_bias", torch.randn(d_model, generator=generator)),
        ("latent_bias", torch.randn(n_dirs, generator=generator)),
        ("stats_last_nonzero", torch.zeros(n_dirs, dtype=torch.long)),
        ("encoder.weight", encoder),
        ("decoder.weight", decoder.T.contiguous().T),  # column-major, as their init stores it
    ])
    folder = root / f"unet.{layer}_k{k}_hidden{n_dirs}_auxk256_bs4096_lr0.0001" / "final"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"n_dirs_local": n_dirs, "d_model": d_model, "k": k, "auxk": 256, "dead_steps_threshold": 2441}))
    torch.save({"state_dict": state}, folder / "state_dict.pth")
    torch.save({"mean": torch.rand(n_dirs)}, folder / "mean.pt")
    return folder


def test_an_sae_in_their_format_loads_without_unpickling(tmp_path: Path) -> None:
    from ddr_core.sae_unbox import find_unbox_folder, load_unbox_sae

    folder = _their_layout(tmp_path, "up_blocks.0.attentions.1")
    _their_layout(tmp_path, "mid_block.attentions.0", seed=1)
    assert find_unbox_folder(tmp_path, "up_blocks.0.attentions.1") == folder
    sae = load_unbox_sae(folder, expected_d_in=32)
    saved = torch.load(folder / "state_dict.pth", weights_only=True)["state_dict"]  # the reference reader
    for name in ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias"):
        torch.testing.assert_close(sae.get_parameter(name).detach(), saved[name])
    x = torch.randn(5, 32)
    pre = (x - saved["pre_bias"]) @ saved["encoder.weight"].T + saved["latent_bias"]
    torch.testing.assert_close(sae.feature_activations(x), torch.relu(pre))
    top = sae.encode(x)
    assert ((top > 0).sum(-1) <= 4).all()
    with pytest.raises(SaeFormatError, match="d_model=32 but the hooked layer has width 1280"):
        load_unbox_sae(folder, expected_d_in=1280)
    with pytest.raises(SaeFormatError, match="no sdxl-unbox SAE for layer 'down_blocks.2.attentions.1'"):
        find_unbox_folder(tmp_path, "down_blocks.2.attentions.1")


def test_a_checkpoint_that_names_another_callable_is_refused(tmp_path: Path) -> None:
    from ddr_core.sae_unbox import load_unbox_sae

    folder = _their_layout(tmp_path, "mid_block.attentions.0")
    path = folder / "state_dict.pth"
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    program = next(name for name in entries if name.endswith("data.pkl"))
    entries[program] = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echoq\x00\x85q\x01Rq\x02."
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(SaeFormatError, match=r"names 'os\.system', which ddr does not run"):
        load_unbox_sae(folder)
    path.write_bytes(b"\x80\x02}q\x00.")  # an old-style (pre-zip) pickle
    with pytest.raises(SaeFormatError, match="not a torch zip checkpoint"):
        load_unbox_sae(folder)


def test_unbox_basis_reduces_dreams_and_steers_along_decoder_columns(tmp_path: Path) -> None:
    from ddr_core.sae_unbox import UnboxSaeBasis, load_unbox_sae

    sae = load_unbox_sae(_their_layout(tmp_path, "mid_block.attentions.0"))
    basis = UnboxSaeBasis(sae)
    tokens = torch.randn(3, 7, 32)
    reduced = basis.reduce(tokens)
    assert reduced.shape == (3, 64)
    units = torch.tensor([0, 9, 63])
    torch.testing.assert_close(basis.unit_activations(tokens, units), reduced[torch.arange(3), units])
    directions = basis.directions([9, 2])
    torch.testing.assert_close(directions, sae.decoder.weight[:, [9, 2]].T.detach())
    assert torch.allclose(directions.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match=r"SAE features must lie in \[0, 64\)"):
        basis.directions([64])


def test_the_builtin_tiny_sdxl_sae_matches_the_tiny_layers(tmp_path: Path, sdxl: StableDiffusionXLFamily) -> None:
    from ddr_core.sae_unbox import find_unbox_folder, load_unbox_sae

    root = build_tiny_sdxl_sae(tmp_path / "sae")
    for layer in SDXL_UNBOX_LAYERS:
        sae = load_unbox_sae(find_unbox_folder(root, layer), expected_d_in=sdxl.layer_width(layer))
        assert sae.num_latents == 128


# ----------------------------------------------------------------------------------------------- config


def test_variant_hook_is_validated_at_config_load() -> None:
    from ddr_core.config import VariantConfig, load_project_config

    with pytest.raises(ValueError, match="basis 'sdxl-unbox' reads the block's residual update: set `hook: residual`"):
        VariantConfig(model="m", prompts="p", basis="sdxl-unbox", sae="s", width=4)
    with pytest.raises(ValueError, match="hook"):
        VariantConfig(model="m", prompts="p", width=4, hook="input")
    project = load_project_config()
    assert project.hook_of("tiny-sdxl-sae") == "residual" and project.hook_of("tiny-sdxl-raw") == "output"
    assert project.capture_of("tiny-sdxl-sae") != project.capture_of("tiny-sdxl-raw")
    for name in ("tiny-sdxl-raw", "tiny-sdxl-sae", "tiny-sdxl-turbo-raw", "sdxl-turbo-raw", "sdxl-turbo-unbox-up01"):
        assert name not in project.default_variants  # not in `make demo`'s work


def test_a_residual_and_an_output_variant_cannot_share_a_capture(tmp_path: Path) -> None:
    from ddr_core.config import ConfigError, load_project_config

    text = """
models: {m: {source: {builtin: tiny-sdxl}, default_layer: mid_block.attentions.0}}
saes: {s: {source: {builtin: tiny-sdxl-sae}}}
prompt_datasets: {p: {source: {builtin: tiny-prompts}}}
variants:
  a: {model: m, prompts: p, width: 32}
  b: {model: m, prompts: p, basis: sdxl-unbox, sae: s, hook: residual, width: 128}
"""
    path = tmp_path / "ddr.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="capture group 'm' mixes"):
        load_project_config(path)


def test_the_real_sdxl_entries_download_from_a_fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config's stabilityai/sdxl-turbo and surokpro2/sdxl-saes sources fetch exactly the chosen files."""
    from ddr_core.config import load_project_config
    from ddr_core.provisioning import HubSource, engine, provision
    from tests.fake_remote import FakeRemote

    monkeypatch.setattr(engine, "RETRY_BACKOFF_S", 0.0)
    for name in ("HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    project = load_project_config()
    turbo_files = {path: f"{path}\n".encode() for path in [
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "sd_xl_turbo_1.0.safetensors",
        "sd_xl_turbo_1.0_fp16.safetensors", "README.md",
        *(f"{c}/config.json" for c in ("unet", "vae", "text_encoder", "text_encoder_2")),
        *(f"{c}/model{v}.safetensors" for c in ("text_encoder", "text_encoder_2") for v in ("", ".fp16")),
        *(f"{c}/diffusion_pytorch_model{v}.safetensors" for c in ("unet", "vae") for v in ("", ".fp16")),
        "vae_decoder/model.onnx",
    ]}
    blocks = [f"unet.{layer}_k10_hidden5120_auxk256_bs4096_lr0.0001" for layer in SDXL_UNBOX_LAYERS]
    sae_files = {f"{block}/final/{name}": f"{block}{name}".encode() for block in blocks
                 for name in ("config.json", "state_dict.pth", "mean.pt", "std.pt")}
    sae_files.update({"unet.mid_block.attentions.0_k20_hidden640_auxk256_bs4096_lr0.0001/final/config.json": b"{}",
                      "README.md": b"# saes\n"})
    remote = FakeRemote()
    try:
        for entry, files in (("sdxl-turbo", turbo_files), ("sdxl-unbox", sae_files)):
            config = (project.models[entry] if entry in project.models else project.saes[entry]).source.hub
            remote.add_hub_repo(config.repo_id, files)
            provision(HubSource(repo_id=config.repo_id, revision=config.revision,
                                allow_patterns=config.allow_patterns, endpoint=remote.url), tmp_path / entry)
    finally:
        remote.close()
    got = {p.relative_to(tmp_path / "sdxl-turbo").as_posix() for p in (tmp_path / "sdxl-turbo").rglob("*")
           if p.is_file() and not p.name.startswith(".ddr")}
    assert got == {path for path in turbo_files if ("fp16" in path and "/" in path) or not path.endswith(
        (".safetensors", ".onnx", ".md"))}
    got = {p.relative_to(tmp_path / "sdxl-unbox").as_posix() for p in (tmp_path / "sdxl-unbox").rglob("*")
           if p.is_file() and not p.name.startswith(".ddr")}
    assert got == {f"{block}/final/{name}" for block in blocks for name in ("config.json", "state_dict.pth")}


# ------------------------------------------------------------------------------------------ Turbo statistics


def _turbo_store(tmp_path: Path, turbo: StableDiffusionXLFamily, steps: int, guidance: float):
    from ddr_core.activation_store import ActivationStore
    from ddr_core.activations import CaptureConfig, run_capture
    from ddr_core.tiny_model import TINY_PROMPTS

    root = tmp_path / "data" / f"capture-{steps}"
    result = run_capture(turbo, TINY_SDXL_TARGET_LAYER, {"raw": lambda tokens: tokens.mean(1)}, TINY_PROMPTS[:4],
                         root, tmp_path / "data", CaptureConfig(n_prompts=4, batch_size=4, seed=3,
                                                                num_inference_steps=steps, guidance_scale=guidance))
    assert result.summary["complete"]
    return ActivationStore(root)


def test_turbo_statistics_live_only_at_the_sampled_timesteps(tmp_path: Path, turbo: StableDiffusionXLFamily) -> None:
    """Few-step semantics: a 1-step capture cannot be interpolated (clear error); the sampled profile is the
    frequency at the observed timesteps and 0 elsewhere, so active timesteps and peaks are observed timesteps;
    there is no unconditional half at guidance 0."""
    import polars as pl

    from ddr_core.activation_store import ActivationStoreError
    from ddr_core.statistics import TimestepStatsConfig, compute_timestep_stats

    one = _turbo_store(tmp_path, turbo, steps=1, guidance=0.0)
    assert one.timesteps().tolist() == [999]
    with pytest.raises(ValueError, match="observed only timestep \\[999\\].*set profile: sampled"):
        compute_timestep_stats(one, "raw", tmp_path / "stats1", TimestepStatsConfig(top_k=4))
    summary = compute_timestep_stats(one, "raw", tmp_path / "stats1", TimestepStatsConfig(top_k=4, profile="sampled"))
    assert summary.timesteps == [999] and summary.config["profile"] == "sampled"
    active = pl.read_parquet(tmp_path / "stats1" / "active_timesteps.parquet")
    peaks = pl.read_parquet(tmp_path / "stats1" / "activity_peaks.parquet")
    assert set(active["timestep"].to_list()) == {999} and set(peaks["timestep"].to_list()) == {999}
    with pytest.raises(ActivationStoreError, match="no 'unconditional' activations.*guidance_scale 0"):
        compute_timestep_stats(one, "raw", tmp_path / "stats1u",
                               TimestepStatsConfig(top_k=4, profile="sampled", half="unconditional"))

    four = _turbo_store(tmp_path, turbo, steps=4, guidance=0.0)
    compute_timestep_stats(four, "raw", tmp_path / "stats4", TimestepStatsConfig(top_k=4, profile="sampled"))
    active = pl.read_parquet(tmp_path / "stats4" / "active_timesteps.parquet")
    assert set(active["timestep"].to_list()) <= {999, 749, 499, 249}
    peaks = pl.read_parquet(tmp_path / "stats4" / "activity_peaks.parquet")
    assert peaks.height and set(peaks["timestep"].to_list()) <= {999, 749, 499, 249}
    assert (peaks["timestep"] == peaks["observed_timestep"]).all()


def test_the_interpolated_profile_keeps_its_hash() -> None:
    """`profile: interpolated` (the default, all earlier statistics) stays out of the config hash."""
    from ddr_core.statistics import TimestepStatsConfig

    assert "profile" not in TimestepStatsConfig().resolved()
    assert TimestepStatsConfig().config_hash() == TimestepStatsConfig(profile="interpolated").config_hash()
    assert TimestepStatsConfig(profile="sampled").config_hash() != TimestepStatsConfig().config_hash()


# ------------------------------------------------------------------------------------------- whole graph


def test_the_whole_graph_runs_on_the_tiny_sdxl_variant(tmp_path: Path) -> None:
    """capture -> timestep_stats -> activity_plots -> priors -> dreams -> representation_shards -> html_export on
    tiny-sdxl-raw, and the sdxl-unbox SAE variant through capture and statistics (residual hook)."""
    import dagster as dg
    import polars as pl

    from tests.tiny_graph import materialize, metadata, step_error

    instance = dg.DagsterInstance.ephemeral()
    results = {}
    start = time.process_time()  # CPU seconds (in-process runs): a busy machine does not inflate them

    def run(name: str, key: str, config: dict | None = None) -> None:
        result = materialize(name, key, tmp_path, instance, config)
        assert result.success, step_error(result)
        results[(name, key)] = metadata(result, name)

    run("models", "tiny-sdxl")
    run("saes", "tiny-sdxl-sae")
    run("prompt_datasets", "tiny-prompts")
    run("activations", "tiny-sdxl", {"n_prompts": 4, "batch_size": 4, "num_inference_steps": 4, "seed": 1})
    run("activations", "tiny-sdxl-residual", {"n_prompts": 4, "batch_size": 4, "num_inference_steps": 2, "seed": 1})
    run("timestep_stats", "tiny-sdxl-raw", {"top_k": 8, "peak_separation": 50})
    run("timestep_stats", "tiny-sdxl-sae", {"top_k": 10})
    channels_table = pl.read_parquet(tmp_path / "outputs" / "default" / "timestep_stats" / "tiny-sdxl-raw"
                                     / "channels.parquet")
    active = channels_table.filter(pl.col("is_active") & (pl.col("channel") < 16))["channel"].to_list()[:2]
    assert len(active) == 2
    run("activity_plots", "tiny-sdxl-raw:0-15")
    run("priors", "tiny-sdxl-raw:0-15", {"channels": active, "n_results": 2, "seeds": [11, 12],
                                         "num_inference_steps": 4})
    run("dreams", "tiny-sdxl-raw:0-15", {"channels": active, "n_results": 2, "num_steps": 3,
                                         "timesteps": ["0", "activity_peaks"], "snapshot_every": 3})
    run("representation_shards", "tiny-sdxl-raw:0-15")
    run("html_export", "tiny-sdxl-raw")

    # Turbo: one step without CFG; the variant's overrides give timestep_stats `profile: sampled` (an interpolated
    # profile of one timestep is refused) and priors 4 Turbo steps steering the scheduler step nearest each peak
    run("models", "tiny-sdxl-turbo")
    run("activations", "tiny-sdxl-turbo", {"n_prompts": 4, "batch_size": 4, "num_inference_steps": 1,
                                           "guidance_scale": 0.0, "seed": 1})
    run("timestep_stats", "tiny-sdxl-turbo-raw", {"top_k": 8})
    run("cfg_contrast", "tiny-sdxl-turbo-raw")  # no CFG: one half, said so, no tables
    assert results[("cfg_contrast", "tiny-sdxl-turbo-raw")]["halves"] == 1
    assert "only the conditional half" in results[("cfg_contrast", "tiny-sdxl-turbo-raw")]["reason"]
    stats = tmp_path / "outputs" / "default" / "timestep_stats" / "tiny-sdxl-turbo-raw"
    assert json.loads((stats / "summary.json").read_text())["config"]["profile"] == "sampled"
    assert set(pl.read_parquet(stats / "activity_peaks.parquet")["timestep"].to_list()) == {999}
    turbo_active = pl.read_parquet(stats / "channels.parquet").filter(
        pl.col("is_active") & (pl.col("channel") < 16))["channel"].to_list()[:1]
    run("priors", "tiny-sdxl-turbo-raw:0-15", {"channels": turbo_active, "n_results": 1, "seeds": [5]})
    run("dreams", "tiny-sdxl-turbo-raw:0-15", {"channels": turbo_active, "n_results": 1, "num_steps": 2,
                                               "timesteps": ["activity_peaks"]})
    prior = json.loads(next((tmp_path / "outputs" / "default" / "priors" / "tiny-sdxl-turbo-raw").rglob(
        "prior.json")).read_text())
    assert prior["num_inference_steps"] == 4 and prior["steered_timesteps"] == [999]
    dream = json.loads(next((tmp_path / "outputs" / "default" / "dreams" / "tiny-sdxl-turbo-raw").rglob(
        "dream.json")).read_text())
    assert dream["timesteps"] == [999]
    assert time.process_time() - start < 300
    assert results[("timestep_stats", "tiny-sdxl-raw")]["channels"] == 32
    assert results[("timestep_stats", "tiny-sdxl-sae")]["channels"] == 128
    assert results[("priors", "tiny-sdxl-raw:0-15")]["channels_done"] == 2
    assert results[("dreams", "tiny-sdxl-raw:0-15")]["channels_done"] == 2
    assert 1 <= results[("representation_shards", "tiny-sdxl-raw:0-15")]["with_dreams"] <= 2  # raised ones only
    assert Path(results[("html_export", "tiny-sdxl-raw")]["index_html"]).is_file()


def test_signal_fraction_is_sqrt_alpha_bar_the_clean_share_of_add_noise(sdxl: StableDiffusionXLFamily) -> None:
    timesteps = torch.tensor([0, 500, 999])
    alphas = sdxl.pipe.scheduler.alphas_cumprod
    signal = sdxl.signal_fraction(timesteps)
    assert signal.tolist() == pytest.approx(alphas[timesteps].double().sqrt().tolist())
    clean = torch.ones(3, sdxl.latent_channels, 2, 2)
    noised = sdxl.add_noise(clean, torch.zeros_like(clean), timesteps)
    assert noised[:, 0, 0, 0].double().tolist() == pytest.approx(signal.tolist(), rel=1e-5)
