"""The FLUX.1 family (ddr_core.families.flux) on the tiny random FLUX-architecture model, and the whole asset
graph on its variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddr_core.families import family_of_folder, load_model
from ddr_core.families.flux import (
    TINY_FLUX_LAYER,
    FluxFamily,
    TinyFluxConfig,
    build_tiny_flux,
    latent_image_ids,
    pack_latents,
    sigma_to_timestep,
    timestep_to_sigma,
    unpack_latents,
)
from ddr_core.hooks import capture_activations, steer_layer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "tiny-flux")


@pytest.fixture(scope="module")
def flux(flux_dir: Path) -> FluxFamily:
    model = load_model(flux_dir)
    assert isinstance(model, FluxFamily)
    return model


# ---- pure functions --------------------------------------------------------------------------------


def test_packing_round_trips_and_matches_the_pipeline() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(3, 16, 6, 10)
    tokens = pack_latents(latents)
    assert tokens.shape == (3, 3 * 5, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 3, 16, 6, 10))
    assert torch.equal(unpack_latents(tokens, 6, 10), latents)
    assert torch.equal(unpack_latents(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 48, 80, 8))
    # token i*5 + j is the 2x2 patch at row i, column j (row-major), and img_ids say so
    assert torch.equal(tokens[:, 1 * 5 + 2].reshape(3, 16, 2, 2), latents[:, :, 2:4, 4:6])
    assert torch.equal(
        latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32)
    )
    with pytest.raises(ValueError, match="even height and width"):
        pack_latents(torch.zeros(1, 16, 5, 4))


def test_sigmas_map_onto_the_integer_timesteps_and_back() -> None:
    assert [sigma_to_timestep(s) for s in (1.0, 0.75, 0.5, 0.25, 0.0004, 0.0)] == [999, 750, 500, 250, 0, 0]
    assert sigma_to_timestep(1.7) == 999 and sigma_to_timestep(-0.1) == 0
    assert sigma_to_timestep(0.5, num_train_timesteps=100) == 50
    back = timestep_to_sigma(torch.tensor([0, 250, 999]))
    assert back.dtype == torch.float32 and torch.allclose(back, torch.tensor([0.0, 0.25, 0.999]))
    assert all(sigma_to_timestep(float(timestep_to_sigma(torch.tensor(t)))) == t for t in range(1000))


# ---- the family on the tiny model -------------------------------------------------------------------


def test_the_tiny_flux_folder_loads_as_the_flux_family(flux_dir: Path, flux: FluxFamily) -> None:
    assert family_of_folder(flux_dir) is FluxFamily
    assert json.loads((flux_dir / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert not list(flux_dir.rglob("*.bin")) and list(flux_dir.rglob("*.safetensors"))
    assert flux.latent_channels == 16 and flux.vae_scale_factor == 8 and flux.default_size == (64, 64)
    assert flux.latent_shape(64, 32) == (16, 8, 4)
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        flux.latent_shape(72, 64)
    assert not flux.uses_cfg(7.5) and not flux.uses_cfg(0.0)
    assert flux.num_train_timesteps == 1000


def test_layer_width_is_the_hidden_size(flux: FluxFamily) -> None:
    hidden = TinyFluxConfig().hidden_size
    assert hidden == 32
    for layer in (
        "transformer_blocks.0",
        TINY_FLUX_LAYER,
        "single_transformer_blocks.1",
    ):
        assert flux.layer_width(layer) == hidden
    with pytest.raises(ValueError, match="hook: residual applies to a FLUX transformer block"):
        flux.hook_point("x_embedder", "residual")


def _block_io(flux: FluxFamily, layer: str, sample: torch.Tensor, conditioning) -> dict:
    """What ``layer`` received and returned in one transformer call."""
    seen: dict = {}

    def hook(module, args, kwargs, output):
        seen["input"], seen["output"] = kwargs["hidden_states"], output

    handle = flux.resolve_layer(layer).register_forward_hook(hook, with_kwargs=True)
    try:
        flux.forward_to_layer(flux.hook_point(layer), sample, torch.tensor([500]), conditioning)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("layer", [TINY_FLUX_LAYER, "single_transformer_blocks.0"])
def test_the_hook_point_selects_and_replaces_only_the_image_tokens(flux: FluxFamily, layer: str) -> None:
    conditioning = flux.encode_prompt("a red circle")
    sample = flux.initial_latents([3], 64, 32)
    io = _block_io(flux, layer, sample, conditioning)
    text, image = io["output"]
    assert text.shape == (1, flux.max_sequence_length, 32) and image.shape == (
        1,
        4 * 2,
        32,
    )  # (64/16)x(32/16)
    point = flux.hook_point(layer)
    assert torch.equal(point.read((), {"hidden_states": io["input"]}, io["output"]), image)
    written = point.write((), {}, io["output"], torch.zeros_like(image))
    assert torch.equal(written[0], text) and not written[1].any()
    residual = flux.hook_point(layer, "residual")
    update = residual.read((), {"hidden_states": io["input"]}, io["output"])
    assert torch.allclose(update, image - io["input"])
    assert torch.allclose(residual.write((), {"hidden_states": io["input"]}, io["output"], update)[1], image)
    # forward_to_layer returns the image tokens of that call
    again = flux.forward_to_layer(point, sample, torch.tensor([500]), conditioning)
    assert torch.allclose(again, image)


def test_one_step_generation_tracks_the_mapped_timestep_and_reads_image_tokens(flux: FluxFamily) -> None:
    assert flux.scheduler_timesteps(1) == [999]
    assert flux.scheduler_timesteps(4) == [999, 750, 500, 250]
    latents = flux.initial_latents([1, 2], 64, 64)
    with (
        flux.track_timesteps() as tracker,
        capture_activations(
            flux.hook_point(TINY_FLUX_LAYER),
            tracker,
            {"mean": lambda tokens: tokens.mean(dim=1)},
            cfg=False,
        ) as recording,
        torch.inference_mode(),
    ):
        images = flux.generate(
            prompts=["a red circle", "a blue star"],
            latents=latents,
            height=64,
            width=64,
            num_inference_steps=1,
            guidance_scale=0.0,
        )
    assert tracker.history == [999] == recording.timesteps
    assert recording.conditional["mean"].shape == (1, 2, 32) and recording.unconditional is None
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    with flux.track_timesteps() as tracker, torch.inference_mode():
        final = flux.generate(
            conditioning=flux.encode_prompt("").repeat(2),
            latents=latents,
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=1.0,
            output_type="latent",
        )
    assert tracker.history == flux.scheduler_timesteps(4)
    assert final.shape == (2, 16, 8, 8) and torch.isfinite(final).all()
    assert [image.size for image in flux.decode(final)] == [(64, 64), (64, 64)]


def test_steering_moves_only_image_tokens_at_the_steered_timesteps(flux: FluxFamily) -> None:
    latents = flux.initial_latents([5], 64, 64)
    direction = torch.zeros(1, 32)
    direction[0, 3] = 1.0
    table = torch.zeros(1, 1000)
    table[0, 750] = 100.0

    def run(strengths: torch.Tensor) -> tuple[torch.Tensor, list]:
        with (
            flux.track_timesteps() as tracker,
            capture_activations(
                flux.hook_point(TINY_FLUX_LAYER),
                tracker,
                {"c3": lambda t: t[..., 3:4].mean(dim=1)},
                cfg=False,
            ) as recording,
            steer_layer(flux.hook_point(TINY_FLUX_LAYER), tracker, direction, strengths),
            torch.inference_mode(),
        ):
            flux.generate(
                conditioning=flux.encode_prompt(""),
                latents=latents,
                height=64,
                width=64,
                num_inference_steps=4,
                guidance_scale=1.0,
                output_type="latent",
            )
        return recording.conditional["c3"].flatten(), recording.timesteps

    plain, timesteps = run(torch.zeros(1, 1000))
    steered, _ = run(table)
    assert timesteps == [999, 750, 500, 250]
    # the capture hook runs before the steering hook: the steered step itself reads unsteered, later
    # ones differ
    assert torch.equal(plain[:2], steered[:2]) and not torch.allclose(plain[2:], steered[2:])


def test_add_noise_is_the_flow_matching_forward_process(flux: FluxFamily) -> None:
    clean, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    noised = flux.add_noise(clean, noise, torch.tensor([0, 250, 999]))
    assert torch.equal(noised[0], clean[0])
    assert torch.allclose(noised[1], 0.75 * clean[1] + 0.25 * noise[1])
    assert torch.allclose(noised[2], 0.001 * clean[2] + 0.999 * noise[2], atol=1e-6)


def test_dreams_optimise_token_activations_of_a_block(flux: FluxFamily) -> None:
    from ddr_core.dreams import DreamConfig, DreamObjective, optimise_dreams

    config = DreamConfig(num_steps=3, n_results=2, use_prior=False, augmentation_level=0, snapshot_every=0)
    result = optimise_dreams(
        flux,
        TINY_FLUX_LAYER,
        DreamObjective.raw([1, 2]),
        flux.initial_latents([1, 2], 64, 64),
        [999, 250],
        config,
    )
    assert result.latents.shape == (2, 16, 8, 8) and result.failed == [None, None]
    assert (result.history["activation"].shape == (3, 2)) and torch.isfinite(
        torch.tensor(result.history["loss"])
    ).all()


def test_a_capture_size_flux_cannot_pack_is_refused_before_anything_is_written(flux: FluxFamily) -> None:
    from ddr_core.activations import check_capture_sizes

    with pytest.raises(ValueError, match=r"capture size 72x64: FLUX image sides must be multiples of 16"):
        check_capture_sizes(flux, 72, 64, 4)
    check_capture_sizes(flux, 64, 64, 4)


def test_the_unconditional_half_is_refused_with_a_reason(flux: FluxFamily, tmp_path: Path) -> None:
    """FLUX records no unconditional half; statistics over it fail naming that, not with a crash."""
    from ddr_core.activation_store import ActivationStore, ActivationStoreError, VariantBatch

    store = ActivationStore(tmp_path / "store")
    rows = [
        {"generation_id": 0, "prompt_index": 0, "prompt": "a", "image_index": 0, "seed": 1, "image_path": "x"}
    ]
    store.write_batch(0, rows, [999], {"v": VariantBatch(torch.ones(1, 1, 4), None)}, capture_top_k=2)
    store.finalize()
    with pytest.raises(
        ActivationStoreError,
        match=r"no 'unconditional' activations .*as FLUX.1\); analyse "
        r"half='conditional'",
    ):
        next(iter(store.iter_dense("v", "unconditional")))


# ---- provisioning of the real model: download code against a loopback fake hub ----------------------------


FLUX_REPO = "black-forest-labs/FLUX.1-schnell"
FAKE_FLUX_FILES = {
    "model_index.json": b'{"_class_name": "FluxPipeline"}\n',
    "scheduler/scheduler_config.json": b'{"shift": 1.0}\n',
    "text_encoder/config.json": b"{}\n",
    "text_encoder/model.safetensors": b"\x01" * 300,
    "text_encoder_2/config.json": b"{}\n",
    "text_encoder_2/model-00001-of-00002.safetensors": b"\x02" * 500,
    "text_encoder_2/model-00002-of-00002.safetensors": b"\x03" * 400,
    "text_encoder_2/model.safetensors.index.json": b'{"weight_map": {}}\n',
    "tokenizer/vocab.json": b"{}\n",
    "tokenizer/merges.txt": b"#version: 0.2\n",
    "tokenizer_2/spiece.model": b"\x04" * 50,
    "tokenizer_2/tokenizer.json": b"{}\n",
    "transformer/config.json": b"{}\n",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors": b"\x05" * 700,
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors": b"\x06" * 700,
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors": b"\x07" * 200,
    "transformer/diffusion_pytorch_model.safetensors.index.json": b'{"weight_map": {}}\n',
    "vae/config.json": b"{}\n",
    "vae/diffusion_pytorch_model.safetensors": b"\x08" * 300,
}
NOT_FETCHED = {  # the repo's single-file checkpoints and extras beside the diffusers folders
    "flux1-schnell.safetensors": b"\x09" * 2000,
    "ae.safetensors": b"\x0a" * 900,
    "schnell_grid.jpeg": b"\xff\xd8" * 10,
    "README.md": b"# FLUX.1 [schnell]\n",
}


def test_the_flux_schnell_entry_downloads_the_diffusers_folders_only(tmp_path: Path, monkeypatch) -> None:
    from ddr_core.catalog import provision_entry
    from ddr_core.config import load_project_config
    from ddr_core.paths import DataLayout
    from ddr_core.provisioning import MANIFEST_NAME, engine
    from tests.fake_remote import FakeRemote

    project = load_project_config()
    hub = project.models["flux-schnell"].source.hub
    assert hub is not None and hub.repo_id == FLUX_REPO
    monkeypatch.setattr(engine, "RETRY_BACKOFF_S", 0.0)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server = FakeRemote()
    server.add_hub_repo(FLUX_REPO, {**FAKE_FLUX_FILES, **NOT_FETCHED})
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        layout = DataLayout(tmp_path / "data", project.experiment)
        result = provision_entry(project, layout, "model", "flux-schnell")
    finally:
        server.close()
    folder = layout.model_dir("flux-schnell")
    got = {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }
    assert got == FAKE_FLUX_FILES and sorted(result.fetched) == sorted(FAKE_FLUX_FILES)
    assert server.count("/resolve/main/flux1-schnell.safetensors") == 0


# ---- the whole graph on the tiny FLUX variant -------------------------------------------------------


def build_tiny_flux_graph(data_root: Path, instance) -> dict:
    """Provisioning -> capture -> stats -> plots -> priors -> dreams -> shards -> export on
    ``tiny-flux-raw``."""
    from tests.tiny_graph import materialize, metadata, step_error

    results = {}
    for name, key, config in [
        ("models", "tiny-flux", None),
        ("saes", "tiny-flux-sae", None),
        ("prompt_datasets", "tiny-prompts", None),
        (
            "activations",
            "tiny-flux",
            {"n_prompts": 6, "batch_size": 6, "num_inference_steps": 4, "guidance_scale": 0.0, "seed": 1},
        ),
        ("timestep_stats", "tiny-flux-raw", {"top_k": 5, "peak_separation": 50}),
        ("timestep_stats", "tiny-flux-sae", {"top_k": 10}),
        ("activity_plots", "tiny-flux-raw:0-15", None),
        ("priors", "tiny-flux-raw:0-15", {"channels": [3, 4, 10], "n_results": 2, "seeds": [11, 12]}),
        (
            "dreams",
            "tiny-flux-raw:0-15",
            {
                "channels": [3, 4, 10],
                "n_results": 2,
                "num_steps": 4,  # timesteps: the variant's override [0, observed_peaks]
                "snapshot_every": 2,
            },
        ),
        ("representation_shards", "tiny-flux-raw:0-15", None),
        ("html_export", "tiny-flux-raw", None),
    ]:
        result = materialize(name, key, data_root, instance, config)
        assert result.success, f"{name}[{key}]: {step_error(result)}"
        results[(name, key)] = metadata(result, name)
    return results


def test_the_whole_graph_runs_on_the_tiny_flux_variant(tmp_path: Path) -> None:
    import dagster as dg

    from ddr_core.config import load_project_config
    from ddr_core.paths import DataLayout

    with dg.DagsterInstance.ephemeral() as instance:
        build_tiny_flux_graph(tmp_path, instance)
    layout = DataLayout(tmp_path, load_project_config().experiment)
    stats = json.loads((layout.timestep_stats_dir("tiny-flux-raw") / "summary.json").read_text())
    assert stats["timesteps"] == [999, 750, 500, 250]  # schnell-like 4 steps, sigma -> round(1000 sigma)
    assert stats["config"]["total_timesteps"] == 1000
    priors = layout.stage_dir("priors", "tiny-flux-raw")
    for channel in (3, 4, 10):  # active channels of this capture (fixed seed)
        record = json.loads((priors / f"channel_{channel:05d}" / "prior.json").read_text())
        assert record["num_inference_steps"] == 4 and record["guidance_scale"] == 1.0
        assert set(record["steered_timesteps"]) <= {999, 750, 500, 250}
    dreams = layout.stage_dir("dreams", "tiny-flux-raw")
    dreamed = {c: json.loads((dreams / f"channel_{c:05d}" / "dream.json").read_text()) for c in (3, 4, 10)}
    timesteps = {c: record["timesteps"] for c, record in dreamed.items()}
    assert all(ts and ts[0] == 0 and set(ts) <= {0, 999, 750, 500, 250} for ts in timesteps.values()), (
        timesteps
    )
    assert any(len(ts) > 1 for ts in timesteps.values())
    for channel in (3, 4, 10):
        shard = json.loads(
            (layout.stage_dir("representation", "tiny-flux-raw") / f"channel_{channel:05d}.json").read_text()
        )
        assert shard["observed_timesteps"] == [999, 750, 500, 250] and shard["total_timesteps"] == 1000
        assert shard["errors"] == [] and shard["priors"]["status"] == "done"
        section = shard["dreams"]["noise"]  # raised dreams are dreams; the others are listed with their numbers
        shown, unshown = {r["timestep"] for r in section["results"]}, {r["timestep"] for r in section["not_raised"]}
        assert shown | unshown == set(timesteps[channel])
    index = layout.stage_dir("html_export", "tiny-flux-raw") / "index.html"
    assert index.is_file() and "tiny-flux-raw" in index.read_text(encoding="utf-8")


def test_observed_peaks_are_the_captured_steps_nearest_the_activity_peaks(tmp_path: Path) -> None:
    """With 4 observed steps a plateau's middle (the peak's `timestep`) is often a step the model never ran at;
    the `observed_peaks` keyword dreams at the observed step nearest each peak instead (highest peak first)."""
    import polars as pl

    from ddr_core.dreams import DreamConfig, resolve_dream_timesteps

    pl.DataFrame(
        {
            "channel": [2, 3, 3],
            "peak_rank": [0, 1, 0],
            "timestep": [125, 999, 499],
            "height": [0.2, 0.1, 0.3],
            "plateau_start": [0, 999, 0],
            "plateau_end": [250, 999, 999],
            "observed_timestep": [250, 999, 500],
        }
    ).write_parquet(tmp_path / "activity_peaks.parquet")
    assert resolve_dream_timesteps(tmp_path, 2, [0, "observed_peaks"]) == [0, 250]
    assert resolve_dream_timesteps(tmp_path, 3, ["observed_peaks", "activity_peaks"]) == [500, 999, 499]
    assert resolve_dream_timesteps(tmp_path, 7, ["observed_peaks"]) == []
    assert DreamConfig(timesteps=["0", "observed_peaks"]).timesteps == [0, "observed_peaks"]


def test_auto_dtype_on_cuda_is_the_family_s(flux_dir: Path, tiny_model_dir: Path) -> None:
    """`dtype: auto` means bfloat16 for FLUX on a GPU (it overflows in float16), float16 for Stable Diffusion."""
    from ddr_core.activations import resolve_dtype

    cuda = torch.device("cuda")
    assert resolve_dtype("auto", cuda, flux_dir) == torch.bfloat16
    assert resolve_dtype("auto", cuda, tiny_model_dir) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu"), flux_dir) == torch.float32
    assert resolve_dtype("float16", cuda, flux_dir) == torch.float16  # an explicit choice stands


def test_a_guidance_distilled_variant_embeds_the_guidance_and_shifts_by_resolution(flux: FluxFamily) -> None:
    """FLUX.1-dev's path: guidance_scale goes in as the embedded `guidance` (never a CFG batch), dreams use
    guidance 1, and the dynamic shift makes the timesteps depend on the image size, as the tracker sees them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from ddr_core.families.flux import DREAM_GUIDANCE, build_tiny_flux_transformer

    components = dict(flux.pipe.components)
    components["transformer"] = build_tiny_flux_transformer(TinyFluxConfig(guidance_embeds=True))
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    dev = FluxFamily(FluxPipeline(**components))
    dev.pipe.set_progress_bar_config(disable=True)
    assert dev.guidance_embeds and not dev.uses_cfg(3.5) and dev.max_sequence_length == 16
    guidance: list[torch.Tensor] = []
    handle = dev.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: guidance.append(kwargs["guidance"]), with_kwargs=True
    )
    try:
        latents = dev.initial_latents([1, 2], 64, 64)
        with dev.track_timesteps() as tracker, torch.inference_mode():
            final = dev.generate(
                prompts=["a red circle", "a star"],
                latents=latents,
                height=64,
                width=64,
                num_inference_steps=3,
                guidance_scale=3.5,
                output_type="latent",
            )
        assert final.shape == (2, 16, 8, 8) and len(guidance) == 3
        assert all(g.shape == (2,) and torch.allclose(g, torch.full((2,), 3.5)) for g in guidance)
        assert tracker.history == dev.scheduler_timesteps(3, 64, 64) == dev.scheduler_timesteps(3)
        assert dev.scheduler_timesteps(3, 64, 64) != dev.scheduler_timesteps(3, 1024, 1024)
        assert tracker.history[0] == 999 and tracker.history != flux.scheduler_timesteps(3)  # shifted
        dev.forward_to_layer(
            dev.hook_point(TINY_FLUX_LAYER), latents, torch.tensor([500, 20]), dev.encode_prompt("").expand(2)
        )
        assert torch.equal(guidance[-1], torch.full((2,), DREAM_GUIDANCE))
    finally:
        handle.remove()


def test_signal_fraction_is_one_minus_sigma_the_clean_share_of_add_noise(flux: FluxFamily) -> None:
    timesteps = torch.tensor([0, 250, 999])
    assert flux.signal_fraction(timesteps).tolist() == pytest.approx([1.0, 0.75, 0.001], abs=1e-6)
    clean = torch.ones(3, 16, 2, 2)
    noised = flux.add_noise(clean, torch.zeros_like(clean), timesteps)
    assert noised[:, 0, 0, 0].double().tolist() == pytest.approx(flux.signal_fraction(timesteps).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match=r"outside 0..999"):
        flux.signal_fraction([1000])
