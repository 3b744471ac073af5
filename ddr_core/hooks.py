"""Forward hooks on a diffusion UNet: timestep tracking, activation capture, steering, early exit.

All hooks are context managers that remove themselves in ``finally``, also when the wrapped code
raises. None of them monkeypatches a module.

Classifier-free guidance. diffusers' ``StableDiffusionPipeline`` (checked on 0.42) concatenates
``[negative_prompt_embeds, prompt_embeds]`` and ``[latents] * 2`` when ``guidance_scale > 1``, so
a layer sees a batch of ``2 * batch`` whose first half is the *unconditional* (empty/negative
prompt) branch and whose second half is the *conditional* one. :func:`capture_activations` and
:func:`steer_layer` rely on that order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")

Reducer = Callable[["torch.Tensor"], "torch.Tensor"]
"""Maps float32 tokens ``(batch, positions, channels)`` to per-image features ``(batch, features)``."""


# --------------------------------------------------------------------------------------------------
# Output normalisation
# --------------------------------------------------------------------------------------------------


def layer_output_tensor(output: Any) -> torch.Tensor:
    """The activation tensor inside a layer output: a tensor, a tuple/list (first item) or a
    diffusers ``BaseOutput`` with ``.sample``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(
        f"Cannot find the activation tensor in a layer output of type {type(output).__name__}; "
        "hook a module that returns a tensor, a tuple starting with one, or an object with .sample."
    )


def replace_layer_output(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with its activation tensor replaced by ``tensor``, keeping the container type."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return type(output)([tensor, *output[1:]])
    if isinstance(getattr(output, "sample", None), torch.Tensor):
        output.sample = tensor
        return output
    raise TypeError(
        f"Cannot replace the activation tensor in a layer output of type {type(output).__name__}."
    )


def _read_output(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return layer_output_tensor(output)


def _write_output(args: tuple, kwargs: dict, output: Any, tensor: torch.Tensor) -> Any:
    return replace_layer_output(output, tensor)


@dataclass(frozen=True)
class HookPoint:
    """A named activation inside the denoiser: the module whose call carries it, and how it is read from and
    written back into that call (TransformerLens' hook points, as a value).

    ``read(args, kwargs, output)`` returns the activation ``(B, C, H, W)`` or ``(B, N, C)``;
    ``write(args, kwargs, output, tensor)`` returns the module output with the activation replaced by ``tensor``.
    The default reads and writes the module's output tensor (:func:`layer_output_tensor`); a family whose block
    returns several streams (a DiT block's text and image tokens) or a residual update (output minus input)
    gives its own pair (:meth:`ddr_core.families.ModelFamily.hook_point`).
    """

    name: str
    module: nn.Module
    read: Callable[[tuple, dict, Any], torch.Tensor] = _read_output
    write: Callable[[tuple, dict, Any, torch.Tensor], Any] = _write_output

    def register(self, hook: Callable[[tuple, dict, Any], Any]) -> torch.utils.hooks.RemovableHandle:
        """Register ``hook(args, kwargs, output)`` as a forward hook of :attr:`module` (its return, if not
        ``None``, replaces the output); the caller removes the handle."""
        return self.module.register_forward_hook(
            lambda module, args, kwargs, output: hook(args, kwargs, output), with_kwargs=True
        )


HOOK_KINDS: tuple[str, ...] = ("output", "residual")
"""What a variant reads at its layer: the module's ``output``, or its ``residual`` update (output minus input)."""


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    value = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(value, torch.Tensor):
        raise TypeError("a residual hook point needs a module called with its input tensor first (or as "
                        "hidden_states=); this module was not: use hook: output")
    return value


def _read_residual(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    update = layer_output_tensor(output)
    block_input = _block_input(args, kwargs)
    if block_input.shape != update.shape:
        raise ValueError(f"a residual hook point needs the module's output shaped like its input, got "
                         f"{tuple(update.shape)} from {tuple(block_input.shape)}: use hook: output")
    return update - block_input


def _write_residual(args: tuple, kwargs: dict, output: Any, tensor: torch.Tensor) -> Any:
    return replace_layer_output(output, _block_input(args, kwargs) + tensor)


def hook_point_of(name: str, module: nn.Module, hook: str = "output") -> HookPoint:
    """The :class:`HookPoint` of ``module`` reading its output (``hook="output"``) or its residual update
    ``output - input`` (``"residual"``, what sdxl-unbox's SAEs read on a transformer block; writing a tensor
    back sets the output to ``input + tensor``, so a steering offset added to the update is added to the output).
    """
    if hook == "output":
        return HookPoint(name, module)
    if hook == "residual":
        return HookPoint(name, module, _read_residual, _write_residual)
    raise ValueError(f"unknown hook {hook!r}; use one of {list(HOOK_KINDS)}")


def as_hook_point(layer: nn.Module | HookPoint) -> HookPoint:
    """``layer`` as a :class:`HookPoint` (a bare module: its output tensor)."""
    if isinstance(layer, HookPoint):
        return layer
    return HookPoint(type(layer).__name__, layer)


def activation_tokens(activation: torch.Tensor) -> torch.Tensor:
    """Per-position tokens ``(batch, positions, channels)`` from ``(batch, channels, height, width)``
    (positions in row-major order) or an already token-shaped ``(batch, positions, channels)``."""
    if activation.ndim == 4:
        return activation.flatten(2).transpose(1, 2)
    if activation.ndim == 3:
        return activation
    raise ValueError(
        f"Expected a (batch, channels, height, width) or (batch, positions, channels) activation, "
        f"got shape {tuple(activation.shape)}."
    )


def _timestep_value(timestep: Any) -> float:
    """The one timestep value of a denoiser call (a number or a tensor of equal values), as passed."""
    if isinstance(timestep, torch.Tensor):
        values = timestep.detach().flatten().tolist()  # one read of a device tensor (a sync on a GPU), not two
        if not values:
            raise ValueError("The UNet was called with an empty timestep tensor.")
        if any(value != values[0] for value in values[1:]):
            raise ValueError(f"TimestepTracker needs one timestep per UNet call, got differing values {values}.")
        return float(values[0])
    return float(timestep)


# --------------------------------------------------------------------------------------------------
# Timestep tracking
# --------------------------------------------------------------------------------------------------


class TimestepTracker:
    """Records the integer timestep of every UNet call through a forward pre-hook.

    Use as a context manager around the pipeline call; inner hooks read :attr:`current`.

    Attributes:
        current: Timestep of the UNet call in progress (or the last one); ``None`` before the first.
        history: Timesteps of all UNet calls, in order.

    ``to_timestep`` maps the value the denoiser receives to the integer timestep recorded (default: rounded).
    A flow-matching family passes its sigma -> timestep mapping (e.g. :func:`ddr_core.families.flux.sigma_to_timestep`).
    """

    def __init__(self, unet: nn.Module, to_timestep: Callable[[float], int] | None = None):
        self.unet = unet
        self.to_timestep = to_timestep
        self.current: int | None = None
        self.history: list[int] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        elif len(args) > 1:
            timestep = args[1]
        else:
            raise ValueError("TimestepTracker: the UNet was called without a timestep argument.")
        value = _timestep_value(timestep)
        self.current = int(round(value)) if self.to_timestep is None else int(self.to_timestep(value))
        self.history.append(self.current)

    def __enter__(self) -> TimestepTracker:
        if self._handle is not None:
            raise RuntimeError("TimestepTracker is already active; use one `with` block at a time.")
        self._handle = self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def require_current(self) -> int:
        """:attr:`current`, or a clear error when no UNet call has been seen."""
        if self.current is None:
            raise RuntimeError(
                "No timestep recorded: wrap the pipeline/UNet call in `with TimestepTracker(unet):` "
                "so hooks on inner layers know the current timestep."
            )
        return self.current


# --------------------------------------------------------------------------------------------------
# Activation capture
# --------------------------------------------------------------------------------------------------


HOST_COPIES: tuple[str, ...] = ("per_batch", "per_step")
"""When a recording's per-step tensors go to the CPU: ``per_batch`` (default) or ``per_step`` (the path before)."""

DEFAULT_DEVICE_BUFFER_BYTES = 2**30
"""How much a ``per_batch`` recording holds on the device before it falls back to per-step copies (1 GiB)."""


class HostCopies:
    """Where a recording's per-step tensors wait for the CPU (issue #19: no host-device sync per hooked step).

    - ``per_step``: each tensor is copied to the CPU as it is made (``.cpu()`` inside the hook). On a GPU that is
      a host-device synchronisation per hooked call: the CPU waits for the GPU to reach the layer, and the GPU
      then idles until the CPU queues the rest of the step. The path before issue #19; kept as a setting.
    - ``per_batch``: tensors stay on their device (detached, compact: a view of a larger tensor is cloned, so it
      never keeps a layer activation alive) until :meth:`flush` copies each list to the CPU in one transfer;
      :func:`capture_activations` flushes once, when its ``with`` block ends (after the generation).

    Bound: at most ``max_device_bytes`` are held. A tensor that would pass it makes everything held go to the
    CPU at once (one transfer per list) and every later tensor of this recording is copied per step
    (:attr:`fell_back`). While a list is flushed its stacked copy exists too: device memory stays below
    ``2 * max_device_bytes``. Reduced values are small (steps x batch x features x 4 bytes per reducer and CFG
    half: SD v1.4 at thesis scale, raw 1,280 + SAE 20,480 features, both halves, 50 steps: 8.7 MB per image).

    Both settings give the same tensors, bit for bit (a copy does not change values); on the CPU the
    ``.cpu()`` of either is a no-op.
    """

    def __init__(self, mode: str = "per_batch", max_device_bytes: int = DEFAULT_DEVICE_BUFFER_BYTES):
        if mode not in HOST_COPIES:
            raise ValueError(f"host_copies must be one of {list(HOST_COPIES)}, got {mode!r}")
        if max_device_bytes < 0:
            raise ValueError(f"max_device_bytes must be >= 0, got {max_device_bytes}")
        self.mode = mode
        self.max_device_bytes = int(max_device_bytes)
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self.fell_back = False
        self.transfers = 0  # copies to the CPU made (per step: one per tensor; per batch: one per list flushed)
        self._lists: list[list[torch.Tensor]] = []

    @property
    def deferring(self) -> bool:
        """Whether new tensors are held on their device (``per_batch`` and not fallen back)."""
        return self.mode == "per_batch" and not self.fell_back

    def append(self, values: list[torch.Tensor], tensor: torch.Tensor) -> None:
        """Add ``tensor`` to ``values``: held on its device, or (per step, fallen back) copied to the CPU now."""
        tensor = tensor.detach()
        if not self.deferring:
            values.append(tensor.cpu())
            self.transfers += 1
            return
        size = tensor.numel() * tensor.element_size()
        if tensor.untyped_storage().nbytes() > size:  # a view of something larger: do not keep that alive
            tensor = tensor.clone()
        if self.held_bytes + size > self.max_device_bytes:
            self.flush()
            self.fell_back = True
            values.append(tensor.cpu())
            self.transfers += 1
            return
        values.append(tensor)
        self.held_bytes += size
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        if not any(held is values for held in self._lists):
            self._lists.append(values)

    def flush(self) -> None:
        """Copy every held list to the CPU (one transfer per list; in place: the lists then hold CPU tensors)."""
        for values in self._lists:
            if values:
                host = torch.stack(values).cpu()
                values[:] = list(host.unbind(0))
                self.transfers += 1
        self._lists.clear()
        self.held_bytes = 0


@dataclass
class ActivationRecording:
    """Reduced activations of one layer over a denoising run.

    Attributes:
        timesteps: Timestep of each recorded layer call, ``steps`` entries.
        conditional: Reducer name -> ``(steps, batch, features)`` float32 CPU tensor of the
            conditional branch (the whole batch when there is no classifier-free guidance).
        unconditional: Same for the unconditional branch, or ``None`` when not recorded
            (no guidance, or ``keep_unconditional=False``).
        copies: How the per-step values reach the CPU (:class:`HostCopies`; read ``fell_back``, ``transfers``).
    """

    reducer_names: tuple[str, ...]
    keep_unconditional: bool
    timesteps: list[int] = field(default_factory=list)
    copies: HostCopies = field(default_factory=HostCopies, repr=False)
    _conditional_steps: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _unconditional_steps: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in self.reducer_names:
            self._conditional_steps.setdefault(name, [])
            self._unconditional_steps.setdefault(name, [])

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def _stack(steps: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        # .cpu(): read inside the ``with`` block, a per_batch recording still holds device tensors
        return {name: torch.stack(values).cpu() if values else torch.empty(0) for name, values in steps.items()}

    @property
    def conditional(self) -> dict[str, torch.Tensor]:
        return self._stack(self._conditional_steps)

    @property
    def unconditional(self) -> dict[str, torch.Tensor] | None:
        if not self.keep_unconditional or not any(self._unconditional_steps.values()):
            return None
        return self._stack(self._unconditional_steps)


@contextmanager
def capture_activations(
    layer: nn.Module | HookPoint,
    tracker: TimestepTracker,
    reducers: Mapping[str, Reducer],
    cfg: bool,
    keep_unconditional: bool = True,
    host_copies: str = "per_batch",
    max_device_bytes: int = DEFAULT_DEVICE_BUFFER_BYTES,
) -> Iterator[ActivationRecording]:
    """Record reduced activations of ``layer`` at every call (one call per denoising step).

    Args:
        layer: Hook point (or module, whose output is read) recorded (``(B, C, H, W)`` or ``(B, HW, C)``).
        tracker: Active :class:`TimestepTracker` on the UNet (gives each call's timestep).
        reducers: Name -> function from float32 tokens ``(B, N, C)`` to ``(B, F)``
            (e.g. :meth:`ddr_core.basis.Basis.reduce`).
        cfg: Whether the layer's batch is ``[unconditional; conditional]`` (guidance on). Must match
            the pipeline call (``guidance_scale > 1``).
        keep_unconditional: Also store the unconditional half (ignored when ``cfg`` is False).
        host_copies: ``per_batch`` (default): the reduced values stay on the model's device during the
            generation and go to the CPU once, when the ``with`` block ends; ``per_step``: copied in the hook at
            every step (a host-device sync per step on a GPU; the path before). Same values either way.
        max_device_bytes: ``per_batch`` holds at most this many bytes on the device; past it the recording
            copies what it holds and falls back to per-step copies (:class:`HostCopies`).

    Yields:
        An :class:`ActivationRecording`, filled while the block runs (detached, float32; on the CPU once the
        block has ended). When the block raises, the hook is removed and nothing is copied (a failed device
        would fail again); the recording's properties still return CPU tensors.
    """
    recording = ActivationRecording(
        reducer_names=tuple(reducers), keep_unconditional=keep_unconditional and cfg,
        copies=HostCopies(host_copies, max_device_bytes),
    )

    point = as_hook_point(layer)

    def hook(args: tuple, kwargs: dict, output: Any) -> None:
        timestep = tracker.require_current()
        with torch.no_grad():
            tokens = activation_tokens(point.read(args, kwargs, output)).detach().float()
            if cfg:
                if tokens.shape[0] % 2:
                    raise ValueError(
                        f"capture_activations(cfg=True) got an odd layer batch of {tokens.shape[0]}; "
                        "pass cfg=False when guidance_scale <= 1."
                    )
                unconditional_tokens, conditional_tokens = tokens.chunk(2)
            else:
                unconditional_tokens, conditional_tokens = None, tokens
            for name, reduce in reducers.items():
                recording.copies.append(recording._conditional_steps[name], reduce(conditional_tokens).float())
                if unconditional_tokens is not None and recording.keep_unconditional:
                    recording.copies.append(recording._unconditional_steps[name],
                                            reduce(unconditional_tokens).float())
        recording.timesteps.append(timestep)

    handle = point.register(hook)
    try:
        yield recording
    finally:
        handle.remove()
    recording.copies.flush()  # once per batch, after the generation (not reached when the block raised)


# --------------------------------------------------------------------------------------------------
# Steering
# --------------------------------------------------------------------------------------------------


StrengthSchedule: TypeAlias = "torch.Tensor | Callable[[int], torch.Tensor]"


def _strengths_at(strengths: StrengthSchedule, timestep: int, batch: int) -> torch.Tensor:
    if callable(strengths):
        values = torch.as_tensor(strengths(timestep), dtype=torch.float32).flatten()
    else:
        if not 0 <= timestep < strengths.shape[1]:
            raise ValueError(
                f"Timestep {timestep} is outside the strength table of {strengths.shape[1]} timesteps."
            )
        values = strengths[:, timestep].float()
    if values.numel() != batch:
        raise ValueError(
            f"Steering strengths give {values.numel()} values for a batch of {batch} directions."
        )
    return values


PositionGate = Callable[["torch.Tensor"], "torch.Tensor"]


def _gate_positions(activation: torch.Tensor, steered: torch.Tensor, gate: PositionGate) -> torch.Tensor:
    """``steered`` where ``gate(tokens of activation)`` is True, ``activation`` (bit-identical) elsewhere."""
    tokens = activation_tokens(activation)
    with torch.no_grad():
        mask = torch.as_tensor(gate(tokens.detach()))
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"a position gate must return a bool mask of shape {tuple(tokens.shape[:2])} "
                         f"(layer batch, positions), got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.to(activation.device)
    if activation.ndim == 4:
        mask = mask.reshape(activation.shape[0], 1, *activation.shape[2:])
    else:
        mask = mask[:, :, None]
    return torch.where(mask, steered, activation)


@contextmanager
def steer_layer(
    layer: nn.Module | HookPoint,
    tracker: TimestepTracker,
    directions: torch.Tensor,
    strengths: StrengthSchedule,
    positions: PositionGate | None = None,
) -> Iterator[None]:
    """Add ``strengths[b](t) * directions[b]`` at every spatial position of batch element ``b``
    (or only at the positions ``positions`` selects).

    Each batch element can be pushed along its own direction (its own channel or SAE feature).
    Under classifier-free guidance the layer batch is a multiple of ``B``; the same per-element
    offsets are added to each ``B``-sized part (unconditional and conditional halves alike).
    Elements with strength 0 at the current timestep are left bit-identical.

    Args:
        layer: Hook point (or module, whose output is steered); ``(L, C, H, W)`` or ``(L, HW, C)``, ``L % B == 0``.
        tracker: Active :class:`TimestepTracker` on the UNet.
        directions: ``(B, C)`` directions (:meth:`ddr_core.basis.Basis.directions`).
        strengths: ``(B, num_train_timesteps)`` table indexed by the current timestep, or a
            callable ``timestep -> (B,)``.
        positions: ``None`` (every position), or a gate called at each steered step with the layer's
            *unsteered* tokens ``(L, positions, C)`` (:func:`activation_tokens`; positions row-major) and
            returning an ``(L, positions)`` bool mask: only the ``True`` positions are steered, every other one
            is left bit-identical (e.g. :func:`ddr_core.steering.self_gated_positions`).
    """
    if directions.ndim != 2:
        raise ValueError(f"directions must be (batch, channels), got shape {tuple(directions.shape)}.")
    if isinstance(strengths, torch.Tensor) and (
        strengths.ndim != 2 or strengths.shape[0] != directions.shape[0]
    ):
        raise ValueError(
            f"strengths must be (batch={directions.shape[0]}, num_train_timesteps), got {tuple(strengths.shape)}."
        )
    batch = directions.shape[0]
    point = as_hook_point(layer)
    on_device: dict[torch.device, torch.Tensor] = {}  # the float32 directions, copied to a device once

    def hook(args: tuple, kwargs: dict, output: Any) -> Any:
        values = _strengths_at(strengths, tracker.require_current(), batch)  # a CPU table (callers pass one): no device read
        if not bool((values != 0).any()):
            return None
        activation = point.read(args, kwargs, output)
        layer_batch = activation.shape[0]
        if layer_batch % batch:
            raise ValueError(
                f"Layer batch {layer_batch} is not a multiple of the {batch} steering directions."
            )
        device = activation.device
        if device not in on_device:
            on_device[device] = directions.detach().float().to(device, non_blocking=True)
        # the strengths of this step (a few floats) go up without waiting for the GPU (no stream sync per step);
        # the product is the same float32 multiply as on the CPU, so the offsets are bit-identical
        offsets = (values.to(device, non_blocking=True)[:, None] * on_device[device]).repeat(layer_batch // batch, 1)
        offsets = offsets.to(dtype=activation.dtype)
        channels = activation.shape[1] if activation.ndim == 4 else activation.shape[-1]
        if offsets.shape[1] != channels:
            raise ValueError(
                f"Steering directions have {offsets.shape[1]} channels, the layer has {channels}."
            )
        if activation.ndim == 4:
            steered = activation + offsets[:, :, None, None]
        elif activation.ndim == 3:
            steered = activation + offsets[:, None, :]
        else:
            raise ValueError(f"Cannot steer a layer output of shape {tuple(activation.shape)}.")
        if positions is not None:
            steered = _gate_positions(activation, steered, positions)
        return point.write(args, kwargs, output, steered)

    handle = point.register(hook)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# Early exit
# --------------------------------------------------------------------------------------------------


class StopForward(Exception):  # noqa: N818 - control-flow signal, not an error
    """Raised by :func:`stop_after_layer` to abort a forward pass; ``.output`` is the hook point's activation."""

    def __init__(self, output: Any):
        super().__init__("forward stopped after the hooked layer")
        self.output = output


@contextmanager
def stop_after_layer(layer: nn.Module | HookPoint) -> Iterator[None]:
    """Make ``layer`` raise :class:`StopForward` carrying its activation, skipping the rest of the network."""
    point = as_hook_point(layer)

    def hook(args: tuple, kwargs: dict, output: Any) -> None:
        raise StopForward(point.read(args, kwargs, output))

    handle = point.register(hook)
    try:
        yield
    finally:
        handle.remove()


def forward_to_layer(
    unet: nn.Module,
    layer: nn.Module | HookPoint,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor,
    **unet_kwargs: Any,
) -> torch.Tensor:
    """Run ``unet`` only up to ``layer`` and return its output ``(B, C, H, W)`` (autograd intact).

    ``unet_kwargs``: further keyword arguments of the UNet call (SDXL's ``added_cond_kwargs``).

    Raises:
        RuntimeError: if the forward pass finished without calling ``layer``.
    """
    with stop_after_layer(layer):
        try:
            unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **unet_kwargs)
        except StopForward as stop:
            return stop.output
    raise RuntimeError("forward_to_layer: the UNet forward pass never called the requested layer.")
