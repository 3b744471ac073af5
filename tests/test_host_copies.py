"""Issue #19 item 5: the recording hooks keep their per-step values on the model's device and copy them to the
CPU once per batch (``host_copies: per_batch``), bounded in device memory, with the same values, bit for bit, as
the per-step copies of before (``per_step``, still a setting); and the cheap siblings (timestep tracker, steering,
heatmap regeneration, the dream loop) read the device less often per step. Reads are counted with
:class:`tests.host_reads.HostReads` (on a GPU each is a host-device sync; on the CPU the calls are the same)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddr_core import hooks
from ddr_core.activations import CaptureConfig
from ddr_core.basis import RawChannels, TopKSaeBasis
from ddr_core.families import as_model
from ddr_core.hooks import (
    TimestepTracker,
    activation_tokens,
    capture_activations,
    layer_output_tensor,
    steer_layer,
)
from ddr_core.pipeline import resolve_layer
from ddr_core.sae import Sae
from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER
from tests.host_reads import HostReads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 4
PROMPTS = list(TINY_PROMPTS[:2])
HOOK = "capture_activations.<locals>.hook"
RECORDING = (HOOK, "HostCopies.append", "HostCopies.flush")  # the recording's code (today's and the new)


def _recording_reads(reads: HostReads) -> int:
    return sum(reads.count(function) for function in RECORDING)


def _no_hooks(*modules: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


@pytest.fixture
def layer(tiny_pipe) -> nn.Module:
    layer = resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    yield layer
    assert _no_hooks(layer, tiny_pipe.unet), "a hook was left behind"


@pytest.fixture(scope="module")
def reducers() -> dict:
    return {"raw": RawChannels(None).reduce, "sae": TopKSaeBasis(Sae.random(64, 256, k=8, seed=0)).reduce}


def _generate(pipe, guidance_scale: float = 7.5) -> None:
    latents = as_model(pipe).initial_latents([0, 1], 64, 64, torch.float32, "cpu")
    pipe(PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="latent")


def _record(pipe, layer, reducers, reads: HostReads | None = None, **options):
    """A CFG capture of two images; also the layer's raw outputs of every step (a second, independent hook)."""
    raw: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, output: raw.append(layer_output_tensor(output).detach().clone()))
    try:
        with TimestepTracker(pipe.unet) as tracker, capture_activations(layer, tracker, reducers, cfg=True,
                                                                          **options) as recording:
            if reads is None:
                _generate(pipe)
            else:
                with reads:
                    _generate(pipe)
    finally:
        handle.remove()
    return recording, raw


def test_per_batch_records_the_same_bits_as_per_step_with_the_halves_apart(tiny_pipe, layer, reducers):
    per_step, raw = _record(tiny_pipe, layer, reducers, host_copies="per_step")
    per_batch, _ = _record(tiny_pipe, layer, reducers)  # the default
    small, _ = _record(tiny_pipe, layer, reducers, max_device_bytes=3000)  # falls back part-way (see below)
    assert per_batch.copies.mode == "per_batch" and not per_batch.copies.fell_back and small.copies.fell_back
    assert per_step.timesteps == per_batch.timesteps == small.timesteps and len(per_step.timesteps) == STEPS
    for name in reducers:
        for other in (per_batch, small):
            assert torch.equal(other.conditional[name], per_step.conditional[name])
            assert torch.equal(other.unconditional[name], per_step.unconditional[name])
    # known answer, from the layer's raw outputs: the first half of the CFG batch is the unconditional branch
    for step, output in enumerate(raw):
        tokens = activation_tokens(output.float())
        expected = {"unconditional": tokens[:2].mean(dim=1), "conditional": tokens[2:].mean(dim=1)}
        torch.testing.assert_close(per_batch.unconditional["raw"][step], expected["unconditional"])
        torch.testing.assert_close(per_batch.conditional["raw"][step], expected["conditional"])
    assert not torch.allclose(per_batch.conditional["raw"], per_batch.unconditional["raw"])
    assert per_batch.conditional["sae"].shape == (STEPS, 2, 256)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in per_batch.conditional.values())


def test_per_batch_reads_nothing_from_the_device_during_the_generation(tiny_pipe, layer, reducers):
    during = HostReads()
    recording, _ = _record(tiny_pipe, layer, reducers, reads=during)
    assert _recording_reads(during) == 0  # before issue #19: a .cpu() per reducer, CFG half and step (16 here)
    assert recording.copies.transfers == 4  # after the generation: one per reducer and half
    old = HostReads()
    recording, _ = _record(tiny_pipe, layer, reducers, reads=old, host_copies="per_step")
    assert _recording_reads(old) == STEPS * 2 * 2 == recording.copies.transfers


def test_past_the_device_limit_the_recording_falls_back_to_per_step_copies(tiny_pipe, layer, reducers):
    # one step holds 2 halves x (64 + 256 features) x 2 images x 4 bytes = 5,120 bytes; the limit fits 2 steps
    per_step_bytes = 2 * (64 + 256) * 2 * 4
    reads = HostReads()
    recording, _ = _record(tiny_pipe, layer, reducers, reads=reads, max_device_bytes=2 * per_step_bytes + 100)
    copies = recording.copies
    assert copies.fell_back and copies.peak_held_bytes == 2 * per_step_bytes and copies.held_bytes == 0
    # steps 1-2 held, flushed at once (4 lists) when step 3 did not fit; steps 3-4 copied per step (2 x 4 values)
    assert copies.transfers == 4 + 2 * 4
    assert reads.count("HostCopies.flush", "cpu") == 4 and reads.count("HostCopies.append", "cpu") == 2 * 4
    assert recording.conditional["sae"].shape == (STEPS, 2, 256)
    zero, _ = _record(tiny_pipe, layer, reducers, max_device_bytes=0)  # 0: every value copied at once
    assert zero.copies.fell_back and zero.copies.peak_held_bytes == 0 and zero.copies.transfers == STEPS * 4
    assert torch.equal(zero.conditional["sae"], recording.conditional["sae"])


def test_a_view_is_held_compact_not_the_activation_it_views(tiny_pipe, layer):
    first_position = {"first": lambda tokens: tokens[:, 0, :]}  # a view of the (batch, positions, 64) tokens
    recording, _ = _record(tiny_pipe, layer, first_position)
    held, _ = _record(tiny_pipe, layer, first_position, host_copies="per_step")
    assert torch.equal(recording.conditional["first"], held.conditional["first"])
    assert recording.copies.peak_held_bytes == STEPS * 2 * (2 * 64 * 4)  # values only, not 64 positions each
    copies = hooks.HostCopies()
    values: list[torch.Tensor] = []
    big = torch.randn(3, 100, 8)
    copies.append(values, big[:, 0, :])
    assert values[0].untyped_storage().nbytes() == 3 * 8 * 4 < big.untyped_storage().nbytes()


def test_hooks_come_off_and_nothing_is_copied_when_the_generation_raises(tiny_pipe, layer):
    calls = {"n": 0}

    def failing(tokens: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 4:  # step 3 (two halves per step)
            raise RuntimeError("reducer failed")
        return tokens.mean(dim=1)

    with pytest.raises(RuntimeError, match="reducer failed"):
        _record(tiny_pipe, layer, {"raw": failing})
    assert _no_hooks(layer, tiny_pipe.unet)
    with pytest.raises(KeyError):
        with TimestepTracker(tiny_pipe.unet) as tracker, capture_activations(
                layer, tracker, {"raw": RawChannels(None).reduce}, cfg=True) as recording:
            _generate(tiny_pipe)
            raise KeyError("after the generation")
    assert _no_hooks(layer, tiny_pipe.unet)
    assert recording.copies.held_bytes > 0 and recording.copies.transfers == 0  # not flushed
    assert recording.conditional["raw"].shape == (STEPS, 2, 64)  # still readable, on the CPU
    for bad, message in (({"host_copies": "sometimes"}, "host_copies"), ({"max_device_bytes": -1}, ">= 0")):
        with pytest.raises(ValueError, match=message):
            hooks.HostCopies(bad.get("host_copies", "per_batch"), bad.get("max_device_bytes", 0))


def test_capture_config_selects_the_copies_and_checks_them():
    assert CaptureConfig().host_copies == "per_batch" and CaptureConfig().host_copy_buffer_mib == 1024
    assert CaptureConfig(host_copies="per_step").host_copies == "per_step"
    with pytest.raises(ValueError, match="host_copies"):
        CaptureConfig(host_copies="never")
    with pytest.raises(ValueError, match="host_copy_buffer_mib"):
        CaptureConfig(host_copy_buffer_mib=-1)


# ----------------------------------------------------------------------------- siblings


class _Denoiser(nn.Module):
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return sample


def test_the_tracker_reads_a_batched_timestep_once():
    unet = _Denoiser()
    tracker = TimestepTracker(unet)
    with tracker, HostReads() as reads:
        unet(torch.zeros(4), timestep=torch.full((4,), 981.0))  # FLUX-style: the timestep expanded to the batch
        unet(torch.zeros(4), torch.tensor(961))  # SD-style: one 0-d timestep, positional
    assert tracker.history == [981, 961]
    assert reads.count("_timestep_value") == 2  # one per call; before: bool(all equal) + float(first) for the first
    with tracker, pytest.raises(ValueError, match="differing values"):
        unet(torch.zeros(2), timestep=torch.tensor([1.0, 2.0]))


def test_steering_copies_nothing_blocking_per_step(tiny_pipe, layer):
    directions = RawChannels(64).directions([3, 7])
    strengths = torch.zeros(2, 1000)
    strengths[:, 500:] = 4.0
    steered = {}
    for name, make in (("table", lambda: strengths), ("callable", lambda: lambda t: strengths[:, t])):
        with TimestepTracker(tiny_pipe.unet) as tracker, steer_layer(layer, tracker, directions, make()), \
                HostReads() as reads:
            latents = as_model(tiny_pipe).initial_latents([0, 1], 64, 64, torch.float32, "cpu")
            steered[name] = tiny_pipe(PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=7.5,
                                      output_type="latent").images
        assert reads.count("steer_layer.<locals>.hook", "to(device)") == 0  # before: one per steered step
    assert torch.equal(steered["table"], steered["callable"])


def test_heatmap_regeneration_holds_its_maps_until_the_chunk_ends(tiny_pipe, layer):
    from ddr_core.heatmaps import basis_unit_maps
    from ddr_core.regenerate import CapturedGeneration, regenerate_positions

    model = as_model(tiny_pipe)
    generations = [CapturedGeneration(g, PROMPTS[g], g, 64, 64, STEPS, 7.5) for g in (0, 1)]
    with HostReads() as reads:
        recording = regenerate_positions(model, generations, model.hook_point(TINY_TARGET_LAYER),
                                         basis_unit_maps(RawChannels(None), [3, 40]), batch_size=2)
    hook = "regenerate_positions.<locals>.hook"
    assert reads.count(hook) + reads.count("HostCopies.append") == 0  # before: a .cpu() per step
    assert reads.count("HostCopies.flush") == 1  # once for the chunk, after its generation
    captured, _ = _record(tiny_pipe, layer, {"raw": RawChannels(None).reduce})  # the same two generations
    assert recording.maps.shape == (2, STEPS, 2, 4, 4) and recording.maps.device.type == "cpu"
    torch.testing.assert_close(recording.maps.mean(dim=(3, 4)).transpose(0, 1),
                               captured.conditional["raw"][:, :, [3, 40]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parameterisation", ["latent", "x0_prediction"])
def test_the_dream_loop_reads_the_device_twice_per_step_and_never_waits_to_copy_up(tiny_pipe, parameterisation):
    from ddr_core.dreams import DreamConfig, DreamObjective, element_generators, optimise_dreams

    model = as_model(tiny_pipe)
    counts = {}
    for steps in (2, 4):
        config = DreamConfig(num_steps=steps, snapshot_every=0, use_prior=False, parameterisation=parameterisation,
                             see_through_schedule_noise=True)
        init = model.initial_latents([1, 2], *model.default_size)
        with HostReads() as reads:
            result = optimise_dreams(tiny_pipe, TINY_TARGET_LAYER, DreamObjective.raw([0, 1]), init, [50, 300],
                                     config, element_generators([1, 2]))
        assert result.failed == [None, None] and np.isfinite(result.history["loss"]).all()
        counts[steps] = {"cpu": reads.count("optimise_dreams", "cpu"),
                         "blocking up": sum(n for (_, what), n in reads.by_function.items() if what == "to(device)")}
    # per step: the statistics with the finite flags (one .cpu()) and the finite check after the update (one);
    # before: five statistics, the flags and the check (.cpu() x 7) and ~8 blocking copies up (rows, frozen mask,
    # augmentation shifts and angles, schedule noise, smoothing kernel, unit indices; more for x0_prediction)
    assert counts[4]["cpu"] - counts[2]["cpu"] == 2 * 2
    assert counts[4]["blocking up"] == counts[2]["blocking up"]  # only the set-up's, none per step


def test_the_capture_stage_copies_as_its_config_says_and_stores_the_same_values(tiny_pipe, tmp_path):
    from ddr_core.activation_store import ActivationStore
    from ddr_core.activations import run_capture

    stored, reads = {}, {}
    for setting in ("per_step", "per_batch"):
        root = tmp_path / setting
        config = CaptureConfig(num_images_per_prompt=1, batch_size=2, num_inference_steps=3, seed=5,
                               host_copies=setting)
        with HostReads() as reads[setting]:
            run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, PROMPTS, root, tmp_path,
                        config)
        stored[setting] = {half: np.concatenate([part[2] for part in ActivationStore(root).iter_dense("raw", half)])
                           for half in ("conditional", "unconditional")}
    assert reads["per_step"].count("HostCopies.append", "cpu") == 3 * 2  # steps x CFG halves
    assert reads["per_batch"].count("HostCopies.append", "cpu") == 0
    assert reads["per_batch"].count("HostCopies.flush", "cpu") == 2  # once per half, after the batch
    for half in ("conditional", "unconditional"):
        assert stored["per_step"][half].shape == (2, 3, 64)
        np.testing.assert_array_equal(stored["per_batch"][half], stored["per_step"][half])


@pytest.mark.parametrize("positions_per_call", [None, 5])
def test_sae_training_vectors_go_to_the_cpu_once_per_step(tiny_pipe, layer, positions_per_call):
    from ddr_core.layer_vectors import VectorSamplingConfig, collect_layer_vectors

    sampling = VectorSamplingConfig(positions_per_call=positions_per_call, seed=3)
    with TimestepTracker(tiny_pipe.unet) as tracker, collect_layer_vectors(
            layer, tracker, cfg=True, sampling=sampling, generation_ids=[10, 11]) as vectors, HostReads() as reads:
        _generate(tiny_pipe)
    # before: a .to("cpu") of each row and half, and a blocking .to(device) of its positions (8 + 8 per step)
    assert reads.count("collect_layer_vectors.<locals>.hook", "to(device)") == STEPS
    stacked = vectors.stacked()
    keep = positions_per_call or 16
    assert stacked["vectors"].shape == (STEPS * 2 * 2 * keep, 64) and stacked["vectors"].dtype == torch.float16
    # the row order is step, half (unconditional first), batch row; each vector is the layer's at its position
    raw, _ = _record(tiny_pipe, layer, {"raw": RawChannels(None).reduce})
    first = stacked["halves"][:keep].unique().tolist(), stacked["rows"][:keep].unique().tolist()
    assert first == ([0], [0])
    step0_conditional = stacked["vectors"][2 * keep:3 * keep].float()  # step 0, conditional half, row 0
    if positions_per_call is None:
        torch.testing.assert_close(step0_conditional.mean(dim=0), raw.conditional["raw"][0, 0], rtol=2e-3, atol=2e-3)
