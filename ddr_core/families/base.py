"""What a stage needs from a text-to-image model, whatever its architecture: :class:`ModelFamily`.

One subclass per model family (SD 1.x, SDXL, a diffusion transformer), like diffusers' one pipeline class per
family. A stage never touches ``pipe.unet`` / ``pipe.transformer``, a scheduler or a VAE itself: it asks the
family for

* the **denoiser** (the network the layers live in), its layers by dotted name (:meth:`resolve_layer`,
  :meth:`layer_width`) and the activation a variant reads and steers there (:meth:`hook_point`);
* **latents**: their shape for an image size (:meth:`latent_shape`), seeded starting noise
  (:meth:`initial_latents`), the scheduler's forward noising (:meth:`add_noise`), how much of the clean latent
  survives that noising (:meth:`signal_fraction`) and decoding (:meth:`decode`);
* **text conditioning** (:meth:`encode_prompt` -> :class:`Conditioning`, a batch-first dict of tensors);
* **timesteps**: the train-timestep range every statistic is indexed by (:attr:`num_train_timesteps`), a
  generation's timesteps (:meth:`scheduler_timesteps`) and a tracker that knows the timestep of each denoiser
  call (:meth:`track_timesteps`);
* **calls**: a whole generation (:meth:`generate`, with hooks active around it) and one denoiser call stopped at
  a layer (:meth:`forward_to_layer`, differentiable, used by dreams).

Latents are always image-shaped ``(batch, channels, height / s, width / s)`` (``s`` = :attr:`vae_scale_factor`)
at this boundary, also for families whose denoiser works on packed tokens (they pack inside
:meth:`generate` / :meth:`forward_to_layer`), so regularisers, augmentations and stored latents are
family-independent.

Timesteps are integers in ``[0, num_train_timesteps)`` at this boundary: the statistics' profile index, the
steering tables' column and the dreams' ``t``. A flow-matching family maps its sigmas onto that range and says
how in its docstring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ddr_core.hooks import HookPoint
from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of a batch: name -> tensor, every tensor batch-first (``(B, ...)``).

    The names are the family's own (``prompt_embeds`` for SD 1.x; ``pooled_prompt_embeds`` too for SDXL).
    """

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def batch(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def repeat(self, n: int) -> Conditioning:
        """Each tensor's batch repeated ``n`` times (a new tensor: ``Tensor.repeat``)."""
        return Conditioning({k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in self.tensors.items()})

    def expand(self, n: int) -> Conditioning:
        """A batch of ``n`` views of a one-row conditioning (no copy: ``Tensor.expand``)."""
        return Conditioning({k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()})


class ModelFamily(ABC):
    """A loaded text-to-image pipeline of one family, seen through the interface every stage uses.

    Subclasses set :attr:`name` (the config's ``family``), :attr:`pipeline_classes` (the diffusers class names
    in ``model_index.json`` this family loads) and implement the abstract methods. ``self.pipe`` stays the
    diffusers pipeline, for code that needs more than this interface.
    """

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    cfg_batch_order: ClassVar[str] = "unconditional, conditional"
    """The layer's batch under classifier-free guidance (diffusers concatenates ``[negative; positive]``)."""
    cuda_auto_dtype: ClassVar[str] = "float16"
    """What a stage's ``dtype: auto`` means on a CUDA device (:func:`ddr_core.activations.resolve_dtype`), as the
    name of a ``torch`` dtype (a name, so that importing the families does not import torch)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.layer_hooks: dict[str, str] = {}
        """Layer name -> ``"output"`` / ``"residual"``: what :meth:`hook_point` reads there when not told
        (:meth:`read_layer_as`; unset layers read their output)."""

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    @abstractmethod
    def check_folder(cls, model_dir: str | Path) -> Path:
        """Check a diffusers folder of this family (components, configs, safetensors headers) before loading.

        Raises:
            ddr_core.pipeline.ModelFolderError: naming the missing component / corrupt file and the fix.
        """

    @classmethod
    @abstractmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> ModelFamily:
        """Load the folder offline (safetensors only), in eval mode on ``device`` with ``dtype`` (float32 if None)."""

    # ------------------------------------------------------------------------------------------- the denoiser
    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The network whose layers are studied (a UNet or a transformer)."""

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def resolve_layer(self, layer_name: str) -> nn.Module:
        """The denoiser's submodule ``layer_name`` (``LayerNotFoundError`` listing the closest names)."""
        from ddr_core.pipeline import resolve_layer

        return resolve_layer(self.denoiser, layer_name)

    def read_layer_as(self, layer_name: str, hook: str) -> ModelFamily:
        """Make :meth:`hook_point` of ``layer_name`` read ``hook`` (``"output"`` or ``"residual"``): a variant's
        ``hook`` field, set by the stage that loads the model for it; returns ``self``."""
        from ddr_core.hooks import HOOK_KINDS

        if hook not in HOOK_KINDS:
            raise ValueError(f"unknown hook {hook!r}; use one of {list(HOOK_KINDS)}")
        self.layer_hooks[layer_name] = hook
        return self

    def hook_point(self, layer_name: str, hook: str | None = None) -> HookPoint:
        """The activation a variant on ``layer_name`` reads and steers: the module's output tensor
        (``hook="output"``) or its residual update, output minus input (``"residual"``;
        :func:`ddr_core.hooks.hook_point_of`). ``None``: what :meth:`read_layer_as` set, else the output."""
        from ddr_core.hooks import hook_point_of

        chosen = hook if hook is not None else self.layer_hooks.get(layer_name, "output")
        return hook_point_of(layer_name, self.resolve_layer(layer_name), chosen)

    @abstractmethod
    def layer_width(self, layer_name: str) -> int:
        """Channels of ``layer_name``'s output (its hidden size for a transformer), from a cheap probe."""

    # ---------------------------------------------------------------------------------------------- latents
    @property
    @abstractmethod
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each side."""

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the image-shaped latent."""

    @property
    @abstractmethod
    def default_size(self) -> tuple[int, int]:
        """The model's native ``(height, width)`` in pixels."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(channels, height / s, width / s)`` of one image-shaped latent (``ValueError`` if not divisible)."""
        scale = self.vae_scale_factor
        if height % scale or width % scale:
            raise ValueError(
                f"height and width must be multiples of the VAE scale factor {scale}, got {height}x{width}."
            )
        return (self.latent_channels, height // scale, width // scale)

    def initial_latents(self, seeds: Sequence[int], height: int, width: int, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> torch.Tensor:
        """Starting noise ``(len(seeds), *latent_shape)`` in ``dtype`` (float32 if None): row ``i`` from its own CPU
        generator seeded ``seeds[i]``, so an image depends only on its seed (and prompt), never on its batch or
        device."""
        dtype = torch.float32 if dtype is None else dtype
        shape = (1, *self.latent_shape(height, width))
        rows = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed))) for seed in seeds]
        if not rows:
            raise ValueError("initial_latents needs at least one seed.")
        return torch.cat(rows).to(device=device, dtype=dtype)

    @abstractmethod
    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The scheduler's forward process: ``clean`` latents noised to each row's timestep ``(B,)``."""

    @abstractmethod
    def signal_fraction(self, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """How much of the clean latent survives :meth:`add_noise` at each timestep: the factor ``s_t`` in
        ``x_t = s_t * clean + n_t * noise`` (``sqrt(alpha_bar_t)`` for DDPM-style schedules, ``1 - sigma`` for
        flow matching). The gradient of anything computed from ``x_t`` with respect to ``clean`` is scaled by
        ``s_t``: at ``s_t ~ 0`` (a zero-terminal-SNR schedule's last timesteps) a dream seeing the schedule's
        noise cannot move its objective (``DreamConfig.min_signal``).

        Returns:
            ``(len(timesteps),)`` float64 CPU, in ``[0, 1]``.
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Any]:
        """Final latents ``(n, C, h, w)`` -> ``n`` PIL images (non-finite values read as 0)."""

    # ------------------------------------------------------------------------------------------- timesteps
    @property
    @abstractmethod
    def num_train_timesteps(self) -> int:
        """Length of every per-timestep profile: timesteps are integers in ``[0, num_train_timesteps)``."""

    @abstractmethod
    def scheduler_timesteps(self, num_inference_steps: int, height: int | None = None,
                            width: int | None = None) -> list[int]:
        """A generation's timesteps in denoising order (on the integer scale above), as the tracker records them.

        ``height`` / ``width`` (pixels; default :attr:`default_size`) matter only to a family whose schedule
        depends on the image size (FLUX.1-dev's resolution-dependent shift); others ignore them."""

    @abstractmethod
    def track_timesteps(self) -> Any:
        """A :class:`ddr_core.hooks.TimestepTracker` (context manager) on the denoiser, reading each call's
        timestep on the integer scale above."""

    # ------------------------------------------------------------------------------------------ conditioning
    @abstractmethod
    def encode_prompt(self, prompt: str) -> Conditioning:
        """One prompt's conditioning, batch 1, no guidance, on the denoiser's device and dtype."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The tokenizer whose length limit truncates prompts (the first text encoder's)."""

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether a generation with ``guidance_scale`` runs the layer on ``[unconditional; conditional]``."""
        return guidance_scale > 1.0

    # ----------------------------------------------------------------------------------------------- calls
    @abstractmethod
    def generate(self, *, latents: torch.Tensor, height: int, width: int, num_inference_steps: int,
                 guidance_scale: float, prompts: Sequence[str] | None = None,
                 conditioning: Conditioning | None = None, output_type: str = "pil") -> Any:
        """A whole generation from image-shaped ``latents`` (``prompts`` or precomputed ``conditioning``).

        Returns:
            PIL images (``output_type="pil"``) or the final image-shaped latents (``"latent"``).
        """

    @abstractmethod
    def forward_to_layer(self, layer: HookPoint | nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                         conditioning: Conditioning) -> torch.Tensor:
        """One denoiser call on image-shaped ``sample`` stopped after ``layer``; its output (autograd intact)."""
