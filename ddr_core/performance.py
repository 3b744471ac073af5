"""GPU efficiency options of the denoiser region that dreams and capture run (:class:`PerformanceConfig`).

Everything here changes *how* the denoiser computes, never *what* a stage computes: the same layer, the same
hooks, the same seeds. Numerics may move within the tolerance of the dtype (bf16 autocast, fused kernels),
which ``tests/test_performance.py`` checks against the plain path on a tiny model. All options default to
off: the plain eager path of before is the default, and ``benchmarks/bench_gpu.py --compare`` times both
side by side on one GPU.

Options (:func:`tuned_denoiser` applies them for the ``with`` body and undoes them after):

- ``channels_last``: the denoiser's weights in ``torch.channels_last`` (NHWC convolutions; cuDNN's tensor-core
  kernels are NHWC, so NCHW inputs are transposed around every convolution). Pays off together with
  ``compile`` (Inductor fuses GroupNorm/SiLU in NHWC); eager GroupNorm in NHWC is slow (measured 7-10% slower
  alone on an H200, BENCHMARKS.md).
- ``compile: blocks``: "regional" ``torch.compile`` of the denoiser's repeated blocks (the classes in the
  model's ``_repeated_blocks``, e.g. ``BasicTransformerBlock``, plus ``ResnetBlock2D``): each block's
  ``forward`` is compiled, so the module hooks of the platform (which stop the forward at the layer by
  raising, or record it) stay outside the compiled code, and blocks of one class share compiled code (fast
  to compile). ``compile_mode`` / ``compile_backend`` pass through (``aot_eager``: no code generation, for
  tests and debugging). CUDA-graph modes are refused: dreams change the batch as elements fail.
- ``attention``: the scaled-dot-product-attention kernel (``torch.nn.attention.sdpa_kernel``): ``auto``
  (PyTorch picks), ``flash``, ``efficient``, ``cudnn`` (CUDA only) or ``math``.
- ``fuse_qkv``: diffusers' ``fuse_qkv_projections`` (one GEMM for Q, K and V of self-attention, one for
  K and V of cross-attention).
- ``autocast``: ``torch.autocast`` to ``bfloat16`` / ``float16`` around the denoiser's forward only (the
  stage's losses, SAE encodings and reducers stay in their dtype); for a denoiser loaded in float32 (a bf16
  denoiser computes in bf16 anyway).

Imports no Dagster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")

COMPILED_EXTRA_BLOCKS = ("ResnetBlock2D",)
COMPILE_RECOMPILE_LIMIT = 64


class PerformanceConfig(BaseModel):
    """How the denoiser computes in dreams and capture (all off: the plain eager path)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels_last: bool = Field(False, description="denoiser weights in channels_last (NHWC convolutions)")
    compile: Literal["off", "blocks"] = Field(
        "off", description="'blocks': torch.compile each repeated block of the denoiser (hooks stay eager)")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode (CUDA-graph modes are not offered: dream batches change shape)")
    compile_backend: Literal["inductor", "aot_eager"] = Field(
        "inductor", description="torch.compile backend ('aot_eager': no code generation; tests, debugging)")
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="scaled-dot-product-attention kernel (flash / efficient / cudnn: CUDA only)")
    fuse_qkv: bool = Field(False, description="fuse the Q/K/V projections of attention (diffusers)")
    autocast: Literal["off", "bfloat16", "float16"] = Field(
        "off", description="torch.autocast dtype around denoiser calls ('off': the denoiser's own dtype)")

    @model_validator(mode="after")
    def _compile_options_need_compile(self) -> PerformanceConfig:
        if self.compile == "off":
            unused = [name for name, default in (("compile_mode", "default"), ("compile_backend", "inductor"))
                      if getattr(self, name) != default]
            if unused:
                raise ValueError(f"{', '.join(unused)} set but compile is 'off': set compile: blocks, or drop "
                                 f"{' and '.join(unused)}")
        return self

    @property
    def is_default(self) -> bool:
        """Whether every option is off (the plain eager path)."""
        return self == PerformanceConfig()

    def describe(self) -> str:
        """The options that are on, e.g. ``channels_last, compile=blocks`` (``plain`` when none)."""
        changed = self.model_dump(exclude_defaults=True)
        return ", ".join(k if v is True else f"{k}={v}" for k, v in changed.items()) or "plain"


def performance_config(value: PerformanceConfig | dict[str, Any] | None) -> PerformanceConfig:
    """``value`` as a :class:`PerformanceConfig` (``None``: all off); errors name the field."""
    if isinstance(value, PerformanceConfig):
        return value
    return PerformanceConfig.model_validate(value or {})


def compiled_block_classes(denoiser: nn.Module) -> tuple[str, ...]:
    """Class names whose instances ``compile: blocks`` compiles (the model's ``_repeated_blocks`` + resnets)."""
    return tuple(dict.fromkeys([*(getattr(denoiser, "_repeated_blocks", None) or ()), *COMPILED_EXTRA_BLOCKS]))


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def check_device(config: PerformanceConfig, device: torch.device) -> None:
    """Refuse options the device cannot run (the message names the option and the fix)."""
    if device.type != "cuda" and config.attention in ("flash", "efficient", "cudnn"):
        raise ValueError(f"performance.attention: {config.attention!r} needs a CUDA device, the denoiser is on "
                         f"{device}; use 'auto' or 'math'")
    if device.type != "cuda" and config.autocast == "float16":
        raise ValueError(f"performance.autocast: 'float16' needs a CUDA device, the denoiser is on {device}; "
                         f"use 'bfloat16' or 'off'")


@contextlib.contextmanager
def tuned_denoiser(denoiser: nn.Module, config: PerformanceConfig | dict[str, Any] | None,
                   hooked: nn.Module | None = None) -> Iterator[None]:
    """Apply ``config`` to ``denoiser`` for the ``with`` body; undo it after (also on errors).

    With every option off this does nothing at all. Apply it once around a whole stage (not per batch):
    compiled blocks are compiled on their first call and reused by every later one. ``hooked``: the module
    the stage hooks (its layer); a block that *contains* it stays eager (its hooks must not run inside
    compiled code; the layer itself may be a compiled block: its hooks run outside its ``forward``).

    Raises:
        ValueError: an option the device cannot run, or ``fuse_qkv`` on a model without
            ``fuse_qkv_projections``.
    """
    config = performance_config(config)
    if config.is_default:
        yield
        return
    parameter = next(denoiser.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    check_device(config, device)
    if config.fuse_qkv and not hasattr(denoiser, "fuse_qkv_projections"):
        raise ValueError(f"performance.fuse_qkv: {type(denoiser).__name__} has no fuse_qkv_projections; "
                         f"set fuse_qkv: false")
    compiled: list[nn.Module] = []
    with contextlib.ExitStack() as stack:
        if config.channels_last:
            denoiser.to(memory_format=torch.channels_last)
            stack.callback(denoiser.to, memory_format=torch.contiguous_format)
        if config.fuse_qkv:
            denoiser.fuse_qkv_projections()
            stack.callback(denoiser.unfuse_qkv_projections)
        if config.compile == "blocks":
            names = set(compiled_block_classes(denoiser))
            options: dict[str, Any] = {"backend": config.compile_backend}
            if config.compile_backend == "inductor":
                options["mode"] = config.compile_mode
            # blocks of one class but other widths (ResnetBlock2D 320/640/1280, with or without a shortcut) and
            # grad vs inference mode are separate compilations of one code object: raise Dynamo's limit of 8
            # (past it, Dynamo silently runs the block eagerly) for the stage
            stack.enter_context(torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT))
            inside = set()
            if hooked is not None:
                inside = {id(m) for m in denoiser.modules()
                          if m is not hooked and any(d is hooked for d in m.modules())}
            for module in denoiser.modules():
                if type(module).__name__ in names and "forward" not in vars(module) and id(module) not in inside:
                    module.forward = torch.compile(module.forward, **options)  # hooks stay in eager _call_impl
                    compiled.append(module)

            def uncompile() -> None:
                for module in compiled:
                    vars(module).pop("forward", None)

            stack.callback(uncompile)
        if config.attention != "auto":
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel([_sdpa_backend(config.attention)]))
        if config.autocast != "off":  # around the denoiser's own calls only, not the stage's losses/reducers
            if "forward" in vars(denoiser):
                raise ValueError(f"performance.autocast: {type(denoiser).__name__}.forward is already replaced on "
                                 f"the instance; set autocast: off")
            plain = denoiser.forward
            autocast = torch.autocast(device.type, dtype=getattr(torch, config.autocast))
            denoiser.forward = autocast(plain)
            stack.callback(vars(denoiser).pop, "forward", None)
        yield
