"""The GPU efficiency options (``ddr_core.performance``): validated at load, the same results as the plain
path on the tiny model (CPU), undone after the stage. GPU timings: ``benchmarks/bench_gpu.py --compare``."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ddr_core.dreams import DreamConfig, DreamObjective, element_generators, optimise_dreams
from ddr_core.families import as_model
from ddr_core.performance import PerformanceConfig, performance_config, tuned_denoiser
from ddr_core.tiny_model import TINY_TARGET_LAYER

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TUNED = {"channels_last": True, "fuse_qkv": True, "compile": "blocks", "compile_backend": "aot_eager",
         "attention": "math"}


# --- configuration -----------------------------------------------------------------------------------


def test_defaults_are_the_plain_path_and_describe_names_what_is_on():
    assert PerformanceConfig().is_default and PerformanceConfig().describe() == "plain"
    assert performance_config(None) == PerformanceConfig()
    config = performance_config(TUNED)
    assert not config.is_default
    assert config.describe() == "channels_last, compile=blocks, compile_backend=aot_eager, attention=math, fuse_qkv"


@pytest.mark.parametrize(("value", "field"), [
    ({"compile_mode": "max-autotune-no-cudagraphs"}, "compile_mode"),  # has no effect without compile
    ({"compile_backend": "aot_eager"}, "compile_backend"),
    ({"compile": "blocks", "compile_mode": "reduce-overhead"}, "compile_mode"),  # CUDA graphs: refused
    ({"attention": "xformers"}, "attention"),
    ({"autocast": "float64"}, "autocast"),
    ({"chanels_last": True}, "chanels_last"),  # a typo is an error, not ignored
])
def test_bad_options_fail_at_load_naming_the_field(value, field):
    with pytest.raises(ValidationError, match=field):
        performance_config(value)


def test_cuda_only_kernels_are_refused_on_cpu_naming_the_fix(tiny_pipe):
    for value in ({"attention": "flash"}, {"attention": "cudnn"}, {"autocast": "float16"}):
        with pytest.raises(ValueError, match=r"performance\.\w+: .* needs a CUDA device"):
            with tuned_denoiser(tiny_pipe.unet, value):
                pass


# --- same results as the plain path ------------------------------------------------------------------


def _pass(pipe, latents):
    """One dream step's pass: forward stopped at the layer, gradient back to the latent."""
    model = as_model(pipe)
    context = model.encode_prompt("").expand(latents.shape[0])
    x = latents.clone().requires_grad_(True)
    out = model.forward_to_layer(model.hook_point(TINY_TARGET_LAYER), x, torch.tensor([10, 500, 900]), context)
    (grad,) = torch.autograd.grad(out[:, :3].mean(), x)
    return out.detach(), grad


def _latents():
    return torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def test_tuned_pass_equals_the_plain_one_and_is_undone_after(tiny_pipe):
    unet = tiny_pipe.unet
    plain_out, plain_grad = _pass(tiny_pipe, _latents())
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    with tuned_denoiser(unet, TUNED):
        assert any("forward" in vars(m) for m in unet.modules())  # the blocks are compiled
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        tuned_out, tuned_grad = _pass(tiny_pipe, _latents())
    torch.testing.assert_close(tuned_out, plain_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tuned_grad, plain_grad, rtol=1e-4, atol=1e-6)
    # undone: no compiled forward left, contiguous weights, the original attention processors
    assert not any("forward" in vars(m) for m in unet.modules())
    assert unet.conv_in.weight.is_contiguous()
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    again_out, again_grad = _pass(tiny_pipe, _latents())
    assert torch.equal(again_out, plain_out) and torch.equal(again_grad, plain_grad)


def test_undone_also_when_the_body_raises(tiny_pipe):
    unet = tiny_pipe.unet
    with pytest.raises(RuntimeError, match="boom"), tuned_denoiser(unet, {"channels_last": True, "autocast": "bfloat16"}):
        assert "forward" in vars(unet)
        raise RuntimeError("boom")
    assert "forward" not in vars(unet) and unet.conv_in.weight.is_contiguous()


def test_bf16_autocast_is_close_to_float32(tiny_pipe):
    plain_out, plain_grad = _pass(tiny_pipe, _latents())
    with tuned_denoiser(tiny_pipe.unet, {"autocast": "bfloat16"}):
        out, grad = _pass(tiny_pipe, _latents())
    assert out.dtype == torch.bfloat16  # it ran in bf16
    scale = plain_out.abs().max()
    assert (out.float() - plain_out).abs().max() < 0.05 * scale
    assert torch.nn.functional.cosine_similarity(grad.flatten(), plain_grad.flatten(), dim=0) > 0.99


def test_dreams_on_the_tuned_path_equal_the_plain_ones(tiny_pipe):
    config = DreamConfig(augmentation_level=1, num_steps=3, snapshot_every=0, use_prior=False)
    objective = DreamObjective.raw([3, 17, 5])
    init = as_model(tiny_pipe).initial_latents([1, 2, 3], *as_model(tiny_pipe).default_size)

    def run():
        return optimise_dreams(tiny_pipe, TINY_TARGET_LAYER, objective, init, [10, 500, 900], config,
                               element_generators([101, 202, 303]))

    plain = run()
    with tuned_denoiser(tiny_pipe.unet, {**TUNED, "compile": "off", "compile_backend": "inductor"}):
        tuned = run()
    torch.testing.assert_close(tuned.latents, plain.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(tuned.history["activation"]),
                               torch.from_numpy(plain.history["activation"]), rtol=1e-4, atol=1e-5)


# --- the stages and assets take it as an option ------------------------------------------------------


STAGE_TUNED = {"channels_last": True, "fuse_qkv": True, "attention": "math"}


def _safetensors_arrays(folder):
    from safetensors.numpy import load_file

    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(str(p)).items()}


def test_capture_and_dreams_stages_on_the_tuned_path_equal_the_plain_ones(tmp_path, tiny_model_dir):
    """``performance`` in a stage's args (what the assets' ``performance:`` run config sends) reaches the
    denoiser, and the stage's outputs equal the plain run's within float tolerance."""
    import numpy as np

    from ddr_core.cluster_payload import run_stage
    from ddr_core.paths import DataLayout
    from tests.test_distributed import CAPTURE, DREAMS, _data_root, _dream_arrays, _request

    roots = {name: _data_root(tmp_path / name, tiny_model_dir) for name in ("plain", "tuned")}
    logs: dict[str, list[str]] = {"plain": [], "tuned": []}
    for name, root in roots.items():
        extra = {"performance": STAGE_TUNED} if name == "tuned" else {}
        for stage, args in (("capture_group", {"group": "tiny", "config": {**CAPTURE, "n_prompts": 2}}),
                            ("dreams_for_variant", {"variant": "tiny-raw", "channels": [5, 9], "config": DREAMS})):
            run_stage(_request(root, stage, {**args, **extra}, stage), log=logs[name].append)
    assert any("performance options: channels_last, attention=math, fuse_qkv" in line for line in logs["tuned"])
    assert not any("performance options" in line for line in logs["plain"])
    capture = {n: _safetensors_arrays(DataLayout(r).activations_dir("tiny")) for n, r in roots.items()}
    dreams = {n: _dream_arrays(r / "outputs/default/dreams/tiny-raw") for n, r in roots.items()}
    for arrays in (capture, dreams):
        assert arrays["plain"] and sorted(arrays["plain"]) == sorted(arrays["tuned"])
        for key, value in arrays["plain"].items():
            if value.dtype.kind == "f":
                np.testing.assert_allclose(arrays["tuned"][key], value, rtol=1e-3, atol=1e-4, err_msg=key)
            else:
                np.testing.assert_array_equal(arrays["tuned"][key], value, err_msg=key)


def test_the_assets_run_config_section_is_checked_before_anything_runs():
    import dagster as dg

    from ddr_assets.activations import ActivationsConfig
    from ddr_assets.configs import PerformanceRunConfig, performance_args
    from ddr_assets.dreams import DreamsRunConfig

    assert performance_args(DreamsRunConfig(), asset="dreams") == {}  # unset: the plain path, args as before
    tuned = DreamsRunConfig(performance=PerformanceRunConfig(compile="blocks", channels_last=True))
    assert performance_args(tuned, asset="dreams") == {"performance": {"channels_last": True, "compile": "blocks"}}
    assert performance_args(ActivationsConfig(performance=PerformanceRunConfig()), asset="activations") == {}
    with pytest.raises(dg.Failure, match=r"invalid config for dreams: .*compile is 'off'"):
        performance_args(DreamsRunConfig(performance=PerformanceRunConfig(compile_mode="max-autotune-no-cudagraphs")),
                         asset="dreams")
    with pytest.raises(ValidationError, match="attention"):
        PerformanceRunConfig(attention="xformers")  # Dagster validates the field when the run config loads


def test_a_block_holding_the_hooked_layer_stays_eager(tiny_pipe):
    """A hook inside a compiled block would run inside compiled code (and the dreams' hook raises to stop
    the forward): the block that contains the stage's layer is not compiled; the layer itself may be."""
    unet = tiny_pipe.unet
    block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    inner = block.attn1
    with tuned_denoiser(unet, {"compile": "blocks", "compile_backend": "aot_eager"}, hooked=inner):
        assert "forward" not in vars(block)  # holds the hooked layer: eager
        others = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock" and m is not block]
        assert others and all("forward" in vars(m) for m in others)
    with tuned_denoiser(unet, {"compile": "blocks", "compile_backend": "aot_eager"}, hooked=block):
        assert "forward" in vars(block)  # the layer itself: its hooks run outside the compiled forward
