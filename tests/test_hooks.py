"""Hooks on the tiny UNet: timestep tracking, capture (with CFG halves), steering, early exit."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers.utils import BaseOutput
from torch import nn

from ddr_core.basis import RawChannels, TopKSaeBasis
from ddr_core.families import as_model
from ddr_core.hooks import (
    StopForward,
    TimestepTracker,
    activation_tokens,
    capture_activations,
    forward_to_layer,
    layer_output_tensor,
    replace_layer_output,
    steer_layer,
    stop_after_layer,
)
from ddr_core.pipeline import resolve_layer
from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER

STEPS = 4
PROMPTS = list(TINY_PROMPTS[:2])


def _all_hooks_removed(*modules: nn.Module) -> bool:
    return all(
        not module._forward_hooks
        and not module._forward_pre_hooks
        and not getattr(module, "_forward_pre_hooks_with_kwargs", {})
        for module in modules
    )


@pytest.fixture
def layer(tiny_pipe) -> nn.Module:
    layer = resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    yield layer
    assert _all_hooks_removed(layer, tiny_pipe.unet), "a test left a hook behind"


def _run(pipe, prompts, seeds, guidance_scale=7.5, steps=STEPS, **kwargs):
    latents = as_model(pipe).initial_latents(seeds, 64, 64, torch.float32, "cpu")
    return pipe(
        list(prompts),
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="latent",
        **kwargs,
    ).images


def _capture(pipe, layer, prompts, seeds, guidance_scale=7.5, reducers=None, **kwargs):
    reducers = reducers or {"raw": RawChannels(None).reduce}
    with (
        TimestepTracker(pipe.unet) as tracker,
        capture_activations(layer, tracker, reducers, cfg=guidance_scale > 1) as recording,
    ):
        _run(pipe, prompts, seeds, guidance_scale, **kwargs)
    return recording


# ----------------------------------------------------------------------------- output normalisation


def test_layer_output_tensor_and_replace():
    tensor = torch.randn(2, 3, 4, 4)
    other = torch.zeros_like(tensor)

    @dataclass
    class Output(BaseOutput):
        sample: torch.Tensor

    assert layer_output_tensor(tensor) is tensor
    assert layer_output_tensor((tensor, "extra")) is tensor
    assert layer_output_tensor(Output(sample=tensor)) is tensor
    assert replace_layer_output(tensor, other) is other
    replaced = replace_layer_output((tensor, "extra"), other)
    assert isinstance(replaced, tuple) and replaced[0] is other and replaced[1] == "extra"
    assert replace_layer_output(Output(sample=tensor), other).sample is other
    with pytest.raises(TypeError):
        layer_output_tensor("not a tensor")


def test_activation_tokens_layouts():
    spatial = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    tokens = activation_tokens(spatial)
    assert tokens.shape == (2, 4, 3)
    assert torch.equal(tokens[1, 2], spatial[1, :, 1, 0])  # row-major positions
    assert activation_tokens(tokens) is tokens
    with pytest.raises(ValueError):
        activation_tokens(torch.zeros(3))


# ----------------------------------------------------------------------------- timestep tracker


def test_tracker_records_the_scheduler_timesteps(tiny_pipe, layer):
    with TimestepTracker(tiny_pipe.unet) as tracker:
        _run(tiny_pipe, PROMPTS, [0, 1], steps=5)
    assert tracker.history == tiny_pipe.scheduler.timesteps.tolist()
    assert tracker.current == tracker.history[-1]
    assert len(set(tracker.history)) == 5


def test_tracker_accepts_positional_keyword_numbers_and_equal_batches():
    module = nn.Module()
    module.forward = lambda sample, timestep=None: sample  # type: ignore[method-assign]
    tracker = TimestepTracker(module)
    with tracker:
        module(torch.zeros(1), torch.tensor(981))
        module(torch.zeros(1), timestep=torch.tensor([761, 761, 761]))
        module(torch.zeros(1), 541.0)
        module(torch.zeros(1), timestep=21)
        with pytest.raises(ValueError, match="differing"):
            module(torch.zeros(1), torch.tensor([1, 2]))
    assert tracker.history == [981, 761, 541, 21]
    assert _all_hooks_removed(module)


def test_tracker_removes_hook_on_exception(tiny_pipe):
    with pytest.raises(RuntimeError, match="boom"), TimestepTracker(tiny_pipe.unet):
        raise RuntimeError("boom")
    assert _all_hooks_removed(tiny_pipe.unet)


# ----------------------------------------------------------------------------- capture


def test_capture_shapes_and_timesteps(tiny_pipe, layer, tiny_sae_dir):
    from ddr_core.sae import load_sae

    sae = load_sae(tiny_sae_dir, expected_d_in=64)
    recording = _capture(
        tiny_pipe, layer, PROMPTS, [0, 1], reducers={"raw": RawChannels(None).reduce, "sae": TopKSaeBasis(sae).reduce}
    )
    assert recording.timesteps == tiny_pipe.scheduler.timesteps.tolist()
    assert recording.conditional["raw"].shape == (STEPS, 2, 64)
    assert recording.conditional["sae"].shape == (STEPS, 2, 256)
    assert recording.unconditional is not None
    assert recording.unconditional["raw"].shape == (STEPS, 2, 64)
    assert recording.unconditional["sae"].shape == (STEPS, 2, 256)
    for tensor in [*recording.conditional.values(), *recording.unconditional.values()]:
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and not tensor.requires_grad
    assert (recording.conditional["sae"] >= 0).all()
    # The prompt differs from the empty prompt, so the two branches differ.
    assert not torch.allclose(recording.conditional["raw"], recording.unconditional["raw"])


def test_reducers_get_float32_tokens_and_sae_reducer_is_mean_of_features(tiny_pipe, layer, tiny_sae_dir):
    from ddr_core.sae import load_sae

    sae = load_sae(tiny_sae_dir)
    seen_dtypes = []

    def all_tokens(tokens: torch.Tensor) -> torch.Tensor:
        seen_dtypes.append(tokens.dtype)
        return tokens.flatten(1)

    recording = _capture(
        tiny_pipe,
        layer,
        PROMPTS,
        [0, 1],
        reducers={"tokens": all_tokens, "sae": TopKSaeBasis(sae).reduce, "raw": RawChannels(None).reduce},
    )
    assert set(seen_dtypes) == {torch.float32}
    tokens = recording.conditional["tokens"].view(STEPS, 2, 16, 64)
    with torch.no_grad():
        expected_sae = sae.feature_activations(tokens).mean(dim=2)
    torch.testing.assert_close(recording.conditional["sae"], expected_sae)
    torch.testing.assert_close(recording.conditional["raw"], tokens.mean(dim=2))


def test_cfg_halves_are_labelled(tiny_pipe, layer):
    """Under CFG the first half is the empty prompt's branch: compare with guidance-free runs."""
    guided = _capture(tiny_pipe, layer, PROMPTS, [4, 5], guidance_scale=7.5)
    conditional_only = _capture(tiny_pipe, layer, PROMPTS, [4, 5], guidance_scale=1.0)
    empty_only = _capture(tiny_pipe, layer, ["", ""], [4, 5], guidance_scale=1.0)
    # At the first step the latents are identical in all three runs.
    torch.testing.assert_close(guided.conditional["raw"][0], conditional_only.conditional["raw"][0])
    torch.testing.assert_close(guided.unconditional["raw"][0], empty_only.conditional["raw"][0])
    assert not torch.allclose(guided.conditional["raw"][0], empty_only.conditional["raw"][0])


def test_no_unconditional_half_without_guidance(tiny_pipe, layer):
    recording = _capture(tiny_pipe, layer, PROMPTS, [0, 1], guidance_scale=1.0)
    assert recording.unconditional is None
    assert recording.conditional["raw"].shape == (STEPS, 2, 64)


def test_keep_unconditional_false(tiny_pipe, layer):
    with (
        TimestepTracker(tiny_pipe.unet) as tracker,
        capture_activations(
            layer, tracker, {"raw": RawChannels(None).reduce}, cfg=True, keep_unconditional=False
        ) as recording,
    ):
        _run(tiny_pipe, PROMPTS, [0, 1])
    assert recording.unconditional is None
    assert recording.conditional["raw"].shape == (STEPS, 2, 64)


def test_capture_under_inference_mode(tiny_pipe, layer):
    with (
        TimestepTracker(tiny_pipe.unet) as tracker,
        capture_activations(layer, tracker, {"raw": RawChannels(None).reduce}, cfg=True) as recording,
        torch.inference_mode(),
    ):
        _run(tiny_pipe, PROMPTS[:1], [0])
    assert recording.conditional["raw"].shape == (STEPS, 1, 64)
    assert torch.isfinite(recording.conditional["raw"] * 2).all()  # usable outside inference mode


def test_capture_errors_and_cleanup(tiny_pipe, layer):
    with pytest.raises(ValueError, match="odd layer batch"):
        with (
            TimestepTracker(tiny_pipe.unet) as tracker,
            capture_activations(layer, tracker, {"raw": RawChannels(None).reduce}, cfg=True),
        ):
            _run(tiny_pipe, PROMPTS[:1], [0], guidance_scale=1.0)
    unused_tracker = TimestepTracker(tiny_pipe.unet)
    with pytest.raises(RuntimeError, match="TimestepTracker"):
        with capture_activations(layer, unused_tracker, {"raw": RawChannels(None).reduce}, cfg=False):
            _run(tiny_pipe, PROMPTS[:1], [0], guidance_scale=1.0)
    # the `layer` fixture asserts that no hook is left behind


# ----------------------------------------------------------------------------- steering (unit level)


def _tracked_identity(timestep: int) -> tuple[nn.Module, TimestepTracker]:
    tracker = TimestepTracker(nn.Identity())
    tracker.current = timestep
    return nn.Identity(), tracker


@pytest.mark.parametrize("layout", ["spatial", "tokens"])
def test_steer_adds_a_different_channel_per_element(layout):
    layer, tracker = _tracked_identity(500)
    directions = RawChannels(8).directions([1, 3])
    strengths = torch.zeros(2, 1000)
    strengths[0, 500] = 2.0
    strengths[1, 500] = -3.0
    x = torch.randn(2, 8, 2, 2) if layout == "spatial" else torch.randn(2, 4, 8)
    with steer_layer(layer, tracker, directions, strengths):
        y = layer(x)
    delta = y - x if layout == "tokens" else (y - x).flatten(2).transpose(1, 2)
    expected = torch.zeros(2, 4, 8)
    expected[0, :, 1] = 2.0
    expected[1, :, 3] = -3.0
    torch.testing.assert_close(delta, expected)
    assert not layer._forward_hooks


def test_steer_applies_to_each_cfg_half_and_skips_zero_strength():
    layer, tracker = _tracked_identity(10)
    directions = RawChannels(4).directions([0, 2])
    x = torch.randn(4, 4, 3, 3)
    with steer_layer(layer, tracker, directions, lambda t: torch.tensor([float(t), 0.0])):
        y = layer(x)
    delta = (y - x).mean(dim=(2, 3))
    expected = torch.zeros(4, 4)
    expected[0, 0] = expected[2, 0] = 10.0
    torch.testing.assert_close(delta, expected)
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])  # strength 0: bit-identical
    tracker.current = 11  # no strength anywhere: output object untouched
    with steer_layer(layer, tracker, directions, torch.zeros(2, 1000)):
        assert layer(x) is x


def test_steer_rejects_bad_shapes():
    layer, tracker = _tracked_identity(0)
    with pytest.raises(ValueError, match="multiple"):
        with steer_layer(layer, tracker, RawChannels(4).directions([0, 1, 2]), torch.ones(3, 1000)):
            layer(torch.zeros(4, 4, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        with steer_layer(layer, tracker, RawChannels(4).directions([0]), torch.ones(1, 1000)):
            layer(torch.zeros(1, 5, 2, 2))
    with pytest.raises(ValueError, match="strengths"):
        with steer_layer(layer, tracker, RawChannels(4).directions([0]), torch.ones(2, 1000)):
            pass
    with pytest.raises(ValueError):
        RawChannels(4).directions([4])
    assert not layer._forward_hooks


# ----------------------------------------------------------------------------- steering (pipeline)


def test_steering_touches_only_the_chosen_channel_at_the_chosen_timestep(tiny_pipe, layer):
    channel, strength = 7, 5.0
    schedule = _run_timesteps(tiny_pipe)
    steered_t = schedule[1]
    strengths = torch.zeros(2, 1000)
    strengths[:, steered_t] = strength
    plain = _capture(tiny_pipe, layer, PROMPTS, [0, 1])
    with TimestepTracker(tiny_pipe.unet) as tracker:
        directions = RawChannels(64).directions([channel, channel])
        with (
            steer_layer(layer, tracker, directions, strengths),
            capture_activations(layer, tracker, {"raw": RawChannels(None).reduce}, cfg=True) as steered,
        ):
            _run(tiny_pipe, PROMPTS, [0, 1])
    assert steered.timesteps == plain.timesteps == schedule
    for half in ("conditional", "unconditional"):
        before = getattr(plain, half)["raw"]
        after = getattr(steered, half)["raw"]
        torch.testing.assert_close(after[0], before[0])  # before the steered timestep: untouched
        delta = after[1] - before[1]  # at the steered timestep: only `channel`, by `strength`
        expected = torch.zeros_like(delta)
        expected[:, channel] = strength
        torch.testing.assert_close(delta, expected, atol=1e-4, rtol=0)
        assert not torch.allclose(after[2], before[2])  # later steps see the changed trajectory


def _run_timesteps(pipe) -> list[int]:
    pipe.scheduler.set_timesteps(STEPS)
    return pipe.scheduler.timesteps.tolist()


def test_per_element_channels_in_one_batch_equal_single_runs(tiny_pipe, layer):
    prompts = list(TINY_PROMPTS[:3])
    seeds = [10, 11, 12]
    channels = [1, 5, 9]
    strengths = torch.zeros(3, 1000)
    strengths[0, :] = 4.0
    strengths[1, 500:] = -6.0
    strengths[2, :300] = 8.0

    def steered_run(indices: list[int]) -> torch.Tensor:
        with (
            TimestepTracker(tiny_pipe.unet) as tracker,
            steer_layer(
                layer, tracker, RawChannels(64).directions([channels[i] for i in indices]), strengths[indices]
            ),
        ):
            return _run(tiny_pipe, [prompts[i] for i in indices], [seeds[i] for i in indices])

    batched = steered_run([0, 1, 2])
    for index in range(3):
        torch.testing.assert_close(batched[index : index + 1], steered_run([index]), atol=1e-4, rtol=1e-4)
    unsteered = _run(tiny_pipe, prompts, seeds)
    assert all(not torch.allclose(batched[i], unsteered[i]) for i in range(3))


# ----------------------------------------------------------------------------- early exit


def _unet_inputs(pipe, batch: int = 2):
    sample = as_model(pipe).initial_latents(list(range(batch)), 64, 64).requires_grad_(True)
    ids = pipe.tokenizer(PROMPTS[:batch], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
    return sample, torch.tensor(500), context


def test_forward_to_layer_returns_the_layer_output_with_autograd(tiny_pipe, layer):
    sample, timestep, context = _unet_inputs(tiny_pipe)
    output = forward_to_layer(tiny_pipe.unet, layer, sample, timestep, context)
    assert output.shape == (2, 64, 4, 4) and output.requires_grad
    output[:, 3].mean().backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0
    assert _all_hooks_removed(layer, tiny_pipe.unet)

    seen = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(layer_output_tensor(out)))
    try:
        with torch.no_grad():
            tiny_pipe.unet(sample, timestep, encoder_hidden_states=context)
    finally:
        handle.remove()
    torch.testing.assert_close(output.detach(), seen[0])


def test_forward_to_layer_cleans_up_after_errors(tiny_pipe, layer):
    sample, timestep, context = _unet_inputs(tiny_pipe)
    with pytest.raises(RuntimeError):
        forward_to_layer(tiny_pipe.unet, layer, sample, timestep, context[..., :5])  # wrong context width
    assert _all_hooks_removed(layer, tiny_pipe.unet)
    stray = nn.Linear(2, 2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="never called"):
        forward_to_layer(tiny_pipe.unet, stray, sample, timestep, context)
    assert _all_hooks_removed(stray)


def test_stop_after_layer_carries_the_output_and_removes_itself(tiny_pipe, layer):
    sample, timestep, context = _unet_inputs(tiny_pipe, batch=1)
    with torch.no_grad(), stop_after_layer(layer), pytest.raises(StopForward) as stop:
        tiny_pipe.unet(sample, timestep, encoder_hidden_states=context)
    assert layer_output_tensor(stop.value.output).shape == (1, 64, 4, 4)
    assert not layer._forward_hooks
    with pytest.raises(KeyError), stop_after_layer(layer):
        raise KeyError("unrelated")
    assert not layer._forward_hooks


def test_hooks_removed_when_the_block_raises(tiny_pipe, layer):
    tracker = TimestepTracker(tiny_pipe.unet)
    with pytest.raises(RuntimeError, match="boom"):
        with (
            tracker,
            capture_activations(layer, tracker, {"raw": RawChannels(None).reduce}, cfg=True),
            steer_layer(layer, tracker, RawChannels(64).directions([0]), torch.ones(1, 1000)),
        ):
            raise RuntimeError("boom")
    # the `layer` fixture asserts that both the layer and the UNet are hook-free
