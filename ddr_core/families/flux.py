"""FLUX.1 (``FluxPipeline``): a rectified-flow diffusion transformer on packed 2x2 latent patches.

What differs from the UNet families, and how this family maps it onto the interface every stage uses
(:class:`~ddr_core.families.base.ModelFamily`):

**Latents.** The VAE has 16 latent channels and downsamples by 8. The transformer works on *tokens*: the
image-shaped latent ``(B, 16, H/8, W/8)`` is cut into 2x2 patches and packed to ``(B, H/16 * W/16, 64)``
(:func:`pack_latents`, exactly ``FluxPipeline._pack_latents``; row-major patch order). At the family boundary
latents stay image-shaped (16 channels); :meth:`FluxFamily.generate` and :meth:`FluxFamily.forward_to_layer`
pack and unpack inside. Image sides must therefore be multiples of 16 pixels. Latents live in the pipeline's
normalised space (``(z - shift_factor) * scaling_factor`` of the VAE's ``z``), as ``output_type="latent"``
returns them; :meth:`FluxFamily.decode` undoes it.

**Conditioning** (:meth:`FluxFamily.encode_prompt`): ``prompt_embeds`` ``(B, L, 4096)`` from the T5 encoder
(``text_encoder_2``, ``L`` = :attr:`FluxFamily.max_sequence_length`: 256 schnell, 512 dev),
``pooled_prompt_embeds`` ``(B, 768)`` from
CLIP's pooled output (the transformer's ``pooled_projections``) and ``txt_ids`` ``(B, L, 3)`` (zeros, the text
tokens' rotary positions; the transformer takes one row). The image tokens' positions ``img_ids``
``(H/16 * W/16, 3)`` depend on the latent's size, not on the prompt, and are computed from it at each call
(:func:`latent_image_ids`).

**Guidance.** FLUX.1 has no classifier-free guidance batch: :meth:`FluxFamily.uses_cfg` is always ``False``,
every layer batch is the conditional one, and there is no unconditional half to record or analyse.
FLUX.1-schnell ignores ``guidance_scale``; a guidance-distilled variant (FLUX.1-dev, ``guidance_embeds`` in
the transformer config) receives it as the embedded ``guidance`` input. Calls outside a generation
(:meth:`FluxFamily.forward_to_layer`, i.e. dreams) use :data:`DREAM_GUIDANCE` (1.0, the unguided model, like
the priors' ``guidance_scale=1``).

**Timesteps.** The scheduler (``FlowMatchEulerDiscreteScheduler``) runs on sigmas in ``(0, 1]``
(``x_sigma = (1 - sigma) * x0 + sigma * noise``; FLUX.1-schnell: 1-4 steps, ``sigma = 1, 0.75, 0.5, 0.25``
for 4). Every statistic, steering table and dream is indexed by an integer timestep in
``[0, num_train_timesteps)`` (1000), so this family maps

    t = clip(round(sigma * num_train_timesteps), 0, num_train_timesteps - 1)      (:func:`sigma_to_timestep`)
    sigma = t / num_train_timesteps                                               (:func:`timestep_to_sigma`)

The pipeline calls the transformer with ``timestep = sigma`` (its scheduler timestep ``sigma * 1000`` cast to
the model dtype, divided by 1000); :meth:`FluxFamily.track_timesteps` maps that value, and
:meth:`FluxFamily.scheduler_timesteps` computes the same values the same way (same dtype rounding, same
resolution-dependent shift ``mu`` for a variant with dynamic shifting), so the tracker and the schedule always
agree. The only non-invertible point is ``sigma = 1`` (pure noise), recorded as ``t = 999`` and mapped back to
``sigma = 0.999``. :meth:`FluxFamily.add_noise` is the flow-matching forward process at ``sigma(t)``.

**Layers and hook points.** Variants sit on a transformer block: ``transformer_blocks.N`` (dual-stream,
19 in FLUX.1) or ``single_transformer_blocks.N`` (single-stream, 38). Both return
``(text_tokens, image_tokens)`` in diffusers 0.42; the hook point (:meth:`FluxFamily.hook_point`) reads and
replaces only the image tokens ``(B, H/16 * W/16, hidden)``: channels are the hidden dimension (3072 in
FLUX.1), positions the image tokens on the ``(H/16) x (W/16)`` grid, row-major. Any other module is read
through its output tensor (the default hook point). A variant with ``hook: residual`` reads the block's
residual update of the image stream instead (output minus input), read and steered as such (writing ``u'``
makes the block return ``input + u'``), as for the other families.

**What the stages' words mean here** (no CFG, 1-4 steps):

* *statistics* (``timestep_stats``) are over the only batch there is, the conditional one; ``half:
  unconditional`` is refused (the capture has no such half) with the reason;
* *observed timesteps* are the 1-4 mapped sigmas (schnell, 4 steps: ``999, 750, 500, 250``; 1 step: ``999``);
  the *activity profile* is interpolated between them onto ``0..999`` and held beyond them (with 4 steps,
  ``0..249`` take the value at 250: the last Euler step goes from sigma 0.25 to 0 without another call), so
  *active timesteps* cover whole ranges and an *activity peak* of a flat stretch sits at its middle, often a
  timestep the model never ran at (each peak row also names the nearest ``observed_timestep``);
* *priors* steer the scheduler steps selected by the statistics (``active_timesteps``: every step where the
  channel was in a top-k; FLUX variants override ``num_inference_steps: 4``);
* *dream timesteps*: the FLUX variants dream at ``[0, observed_peaks]``: ``t = 0`` (sigma 0, the clean latent)
  and the observed step nearest each peak (:func:`ddr_core.dreams.resolve_dream_timesteps`), i.e. a sigma the
  model ran at during capture; ``activity_peaks`` stays available;
* there is no *CFG half* to view or to steer separately: steering adds to the one batch.

The tiny random FLUX-architecture model (:func:`build_tiny_flux`, builtin ``tiny-flux``) and its random SAE
(:func:`build_tiny_flux_sae`, builtin ``tiny-flux-sae``) are built here, offline, in seconds on a CPU.

Why one module over 600 lines: a model family is one module (issue #16): the adapter, its packing and timestep
helpers, its hook points and the builder of its tiny test model live together, so adding FLUX touched this file
plus config, and removing it would be one file too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ddr_core.families.base import Conditioning, ModelFamily
from ddr_core.hooks import HookPoint

PATCH = 2
"""Latent pixels per packed token along each side."""

DREAM_GUIDANCE = 1.0
"""Embedded guidance of calls outside a generation (dreams) for a guidance-distilled variant."""

MAX_T5_TOKENS = 512
"""FluxPipeline's limit on ``max_sequence_length`` (and FLUX.1-dev's prompt length)."""

SCHNELL_T5_TOKENS = 256
"""FLUX.1-schnell's T5 prompt length (its training length, as in the reference implementation)."""


BLOCK_CLASSES: tuple[str, ...] = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
"""Blocks that return ``(text_tokens, image_tokens)``."""

REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "text_encoder_2": ("config.json",),
    "tokenizer": (),
    "tokenizer_2": (),
    "scheduler": ("scheduler_config.json",),
}
"""Component folder -> files that must exist in it (weights are checked separately)."""
_WEIGHTED_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


# --------------------------------------------------------------------------------------------------
# Packing and timesteps
# --------------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Image-shaped ``(B, C, h, w)`` -> tokens ``(B, h/2 * w/2, 4C)`` (2x2 patches, row-major; as
    ``FluxPipeline._pack_latents``)."""
    if latents.ndim != 4 or latents.shape[2] % PATCH or latents.shape[3] % PATCH:
        raise ValueError(
            f"FLUX latents must be (batch, channels, height, width) with even height and width, "
            f"got {tuple(latents.shape)}"
        )
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens ``(B, h/2 * w/2, 4C)`` -> image-shaped ``(B, C, h, w)`` (``height``/``width`` in latent pixels);
    the inverse of :func:`pack_latents`."""
    b, n, d = tokens.shape
    if n != (height // PATCH) * (width // PATCH) or d % (PATCH * PATCH):
        raise ValueError(f"{n} tokens of width {d} cannot be unpacked to a {height}x{width} latent")
    c = d // (PATCH * PATCH)
    grid = tokens.reshape(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, c, height, width)


def latent_image_ids(
    height: int, width: int, device: Any = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rotary positions ``(h/2 * w/2, 3)`` of the image tokens of an ``h x w`` latent: ``(0, row, column)``
    (as ``FluxPipeline._prepare_latent_image_ids``)."""
    rows, columns = height // PATCH, width // PATCH
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


def sigma_to_timestep(sigma: float, num_train_timesteps: int = 1000) -> int:
    """The integer timestep of a flow-matching sigma: ``clip(round(sigma * N), 0, N - 1)``."""
    return int(min(max(round(float(sigma) * num_train_timesteps), 0), num_train_timesteps - 1))


def timestep_to_sigma(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigma of integer timesteps: ``t / N`` (float32); inverts :func:`sigma_to_timestep` except at
    ``sigma = 1`` (``t = N - 1``)."""
    return torch.as_tensor(timesteps).to(torch.float32) / num_train_timesteps


def _calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FluxPipeline's resolution-dependent shift ``mu`` (``diffusers.pipelines.flux.pipeline_flux``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


# --------------------------------------------------------------------------------------------------
# Hook points on the image stream of a block
# --------------------------------------------------------------------------------------------------


def _block_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        isinstance(output, tuple | list)
        and len(output) == 2
        and all(isinstance(item, torch.Tensor) for item in output)
    ):
        return output[0], output[1]
    raise TypeError(
        f"a FLUX transformer block returned {type(output).__name__}, expected the tuple "
        "(text_tokens, image_tokens) of diffusers 0.42; check the installed diffusers version"
    )


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError("a FLUX transformer block was called without its image tokens (hidden_states)")
    return hidden


def read_image_tokens(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    """The image tokens ``(B, N, C)`` a block returns."""
    return _block_output(output)[1]


def write_image_tokens(args: tuple, kwargs: dict, output: Any, tensor: torch.Tensor) -> Any:
    """The block's output with its image tokens replaced by ``tensor`` (text tokens untouched)."""
    text, _ = _block_output(output)
    return (text, tensor)


def read_image_update(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    """The block's residual update of the image stream: output image tokens minus input image tokens."""
    return _block_output(output)[1] - _block_input(args, kwargs)


def write_image_update(args: tuple, kwargs: dict, output: Any, tensor: torch.Tensor) -> Any:
    """The block's output with its image update replaced by ``tensor`` (image tokens = input + ``tensor``)."""
    text, _ = _block_output(output)
    return (text, _block_input(args, kwargs) + tensor)


# --------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------


class FluxFamily(ModelFamily):
    """FLUX.1 (schnell / dev) through the stage interface; see the module docstring for the semantics."""

    name: ClassVar[str] = "flux"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    cfg_batch_order: ClassVar[str] = "none: FLUX.1 has no classifier-free guidance batch (conditional only)"
    cuda_auto_dtype: ClassVar[str] = "bfloat16"
    """FLUX.1 is trained and released in bfloat16; its T5 encoder and transformer overflow in float16."""

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def check_folder(cls, model_dir: str | Path) -> Path:
        """Check a diffusers FLUX folder: components, JSON configs, every safetensors header (sharded
        checkpoints: every shard the index names)."""
        from ddr_core.pipeline import check_model_folder

        root = check_model_folder(model_dir, REQUIRED_COMPONENTS, _WEIGHTED_COMPONENTS)
        return root

    @classmethod
    def load(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> FluxFamily:
        from diffusers import FluxPipeline

        from ddr_core.pipeline import load_diffusers_folder

        dtype = torch.float32 if dtype is None else dtype

        pipe = load_diffusers_folder(
            FluxPipeline,
            cls.check_folder(model_dir),
            device,
            dtype,
            image_encoder=None,
            feature_extractor=None,
        )
        return cls(pipe)

    # ------------------------------------------------------------------------------------- the denoiser
    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes an embedded guidance scale (FLUX.1-dev; not schnell)."""
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    @property
    def hidden_size(self) -> int:
        config = self.denoiser.config
        return int(config.num_attention_heads * config.attention_head_dim)

    def hook_point(self, layer_name: str, hook: str | None = None) -> HookPoint:
        """The image tokens ``(B, N, hidden)`` of a transformer block (``hook="residual"``, a variant's
        ``hook: residual``: its residual update of the image stream, output minus input); any other module: its
        output tensor (a residual update of another module is refused by name)."""
        chosen = hook if hook is not None else self.layer_hooks.get(layer_name, "output")
        module = self.resolve_layer(layer_name)
        if type(module).__name__ not in BLOCK_CLASSES:
            if chosen == "residual":
                raise ValueError(
                    f"{layer_name!r}: hook: residual applies to a FLUX transformer block "
                    f"(transformer_blocks.N or single_transformer_blocks.N), not to a {type(module).__name__}"
                )
            return super().hook_point(layer_name, chosen)
        if chosen == "residual":
            return HookPoint(layer_name, module, read_image_update, write_image_update)
        return HookPoint(layer_name, module, read_image_tokens, write_image_tokens)

    def _probe_conditioning(self) -> Conditioning:
        config, device, dtype = self.denoiser.config, self.device, self.dtype
        return Conditioning(
            {
                "prompt_embeds": torch.zeros(1, 1, config.joint_attention_dim, device=device, dtype=dtype),
                "pooled_prompt_embeds": torch.zeros(
                    1, config.pooled_projection_dim, device=device, dtype=dtype
                ),
                "txt_ids": torch.zeros(1, 1, 3, device=device, dtype=dtype),
            }
        )

    def layer_width(self, layer_name: str) -> int:
        """Channels of the hook point's activation (a block's: the hidden size), from a one-token probe."""
        point = self.hook_point(layer_name)
        sample = torch.zeros(1, self.latent_channels, PATCH, PATCH, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            output = self.forward_to_layer(
                point, sample, torch.zeros(1, dtype=torch.long), self._probe_conditioning()
            )
        return int(output.shape[1] if output.ndim == 4 else output.shape[-1])

    # ------------------------------------------------------------------------------------------ latents
    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // (PATCH * PATCH)

    @property
    def default_size(self) -> tuple[int, int]:
        """The VAE's ``sample_size`` (1024 for FLUX.1), rounded down to a multiple of 16 pixels."""
        size = getattr(self.pipe.vae.config, "sample_size", 1024)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        step = self.vae_scale_factor * PATCH
        return (max(int(height) // step, 1) * step, max(int(width) // step, 1) * step)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        step = self.vae_scale_factor * PATCH
        if height % step or width % step:
            raise ValueError(
                f"FLUX image sides must be multiples of {step} pixels (VAE scale factor "
                f"{self.vae_scale_factor} x the 2x2 patches), got {height}x{width}: use "
                f"{height // step * step or step}x{width // step * step or step}"
            )
        return super().latent_shape(height, width)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Flow matching: ``(1 - sigma) * clean + sigma * noise`` with ``sigma = t / num_train_timesteps``."""
        sigma = timestep_to_sigma(timesteps, self.num_train_timesteps).to(clean.device)
        sigma = sigma.reshape(-1, *([1] * (clean.ndim - 1))).to(clean.dtype)
        return (1 - sigma) * clean + sigma * noise.to(clean.dtype)

    def signal_fraction(self, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``1 - sigma`` (flow matching), ``sigma = t / N`` (:func:`timestep_to_sigma`): 1 at 0, 0.001 at 999."""
        index, total = torch.as_tensor(timesteps).long().flatten().cpu(), self.num_train_timesteps
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= total):
            raise ValueError(f"timesteps {sorted(set(index.tolist()))} lie outside 0..{total - 1}")
        return (1.0 - index.double() / total).clamp(0.0, 1.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Any]:
        """VAE-decode ``(n, 16, h, w)`` (``z = x / scaling_factor + shift_factor``) to PIL images."""
        from PIL import Image

        vae = self.pipe.vae
        scaling = float(vae.config.scaling_factor)
        shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        images = []
        for chunk in latents.split(batch_size):
            chunk = torch.nan_to_num(chunk.float(), nan=0.0, posinf=0.0, neginf=0.0)
            z = (chunk / scaling + shift).to(device=vae.device, dtype=vae.dtype)
            decoded = vae.decode(z).sample
            pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
                images.append(Image.fromarray(array))
        return images

    # ---------------------------------------------------------------------------------------- timesteps
    @property
    def num_train_timesteps(self) -> int:
        return int(getattr(self.pipe.scheduler.config, "num_train_timesteps", 1000))

    def scheduler_timesteps(
        self, num_inference_steps: int, height: int | None = None, width: int | None = None
    ) -> list[int]:
        """The integer timesteps the tracker records in a generation of ``num_inference_steps`` at
        ``height x width`` (default: :attr:`default_size`; only a variant with dynamic shifting depends on
        it).

        Computed as FluxPipeline does: sigmas ``linspace(1, 1/n, n)``, the scheduler's shift, the scheduler
        timestep ``sigma * 1000`` cast to the model dtype and divided by 1000, then :func:`sigma_to_timestep`.
        """
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        config = scheduler.config
        height = height or self.default_size[0]
        width = width or self.default_size[1]
        _, h, w = self.latent_shape(height, width)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        mu = _calculate_shift(
            (h // PATCH) * (w // PATCH),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if sigmas is None:
            scheduler.set_timesteps(num_inference_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        passed = scheduler.timesteps.to(self.dtype) / 1000  # what the transformer receives
        return [sigma_to_timestep(value, self.num_train_timesteps) for value in passed.float().tolist()]

    def track_timesteps(self) -> Any:
        from ddr_core.hooks import TimestepTracker

        total = self.num_train_timesteps
        return TimestepTracker(self.denoiser, to_timestep=lambda sigma: sigma_to_timestep(sigma, total))

    # ------------------------------------------------------------------------------------- conditioning
    @property
    def tokenizer(self) -> Any:
        """CLIP's tokenizer (77 tokens; it feeds the pooled embedding). T5 reads up to
        :attr:`max_sequence_length` tokens."""
        return self.pipe.tokenizer

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt, as Black Forest Labs' reference code sets them: 256 for schnell (no guidance
        embedding), 512 for a guidance-distilled variant (dev); at most the T5 tokenizer's
        ``model_max_length``."""
        limit = getattr(self.pipe.tokenizer_2, "model_max_length", MAX_T5_TOKENS) or MAX_T5_TOKENS
        return int(min(limit, MAX_T5_TOKENS if self.guidance_embeds else SCHNELL_T5_TOKENS))

    def encode_prompt(self, prompt: str) -> Conditioning:
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return Conditioning(
            {
                "prompt_embeds": embeds.to(device=self.device, dtype=self.dtype),
                "pooled_prompt_embeds": pooled.to(device=self.device, dtype=self.dtype),
                "txt_ids": text_ids.to(device=self.device, dtype=self.dtype)[None],
            }
        )

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Never: FLUX.1 is guidance-distilled (schnell ignores ``guidance_scale``, dev embeds it)."""
        return False

    # -------------------------------------------------------------------------------------------- calls
    def generate(
        self,
        *,
        latents: torch.Tensor,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        prompts: Sequence[str] | None = None,
        conditioning: Conditioning | None = None,
        output_type: str = "pil",
    ) -> Any:
        """A whole FluxPipeline generation from image-shaped ``latents`` (packed here; ``"latent"`` output is
        unpacked back to ``(B, 16, h, w)``)."""
        _, h, w = self.latent_shape(height, width)
        if tuple(latents.shape[1:]) != (self.latent_channels, h, w):
            raise ValueError(
                f"latents of shape {tuple(latents.shape)} do not fit a {height}x{width} FLUX image "
                f"(expected (batch, {self.latent_channels}, {h}, {w}))"
            )
        if prompts is not None:
            text: dict[str, Any] = {"prompt": list(prompts)}
        elif conditioning is not None:
            text = {
                "prompt_embeds": conditioning["prompt_embeds"],
                "pooled_prompt_embeds": conditioning["pooled_prompt_embeds"],
            }
        else:
            raise ValueError("generate needs prompts or conditioning")
        images = self.pipe(
            **text,
            latents=pack_latents(latents.to(self.dtype)),
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type=output_type,
            max_sequence_length=self.max_sequence_length,
        ).images
        if output_type == "latent":
            return unpack_latents(images, h, w)
        return images

    def forward_to_layer(
        self,
        layer: HookPoint | nn.Module,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
    ) -> torch.Tensor:
        """One transformer call on image-shaped ``sample`` at integer ``timesteps`` (``sigma = t / 1000``),
        stopped after ``layer``; its activation (image tokens for a block), autograd intact."""
        from ddr_core.hooks import StopForward, stop_after_layer

        batch, _, h, w = sample.shape
        sigma = timestep_to_sigma(timesteps, self.num_train_timesteps).to(self.device).flatten()
        sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
        guidance = (
            torch.full((batch,), DREAM_GUIDANCE, device=self.device, dtype=torch.float32)
            if self.guidance_embeds
            else None
        )
        with stop_after_layer(layer):
            try:
                self.denoiser(
                    hidden_states=pack_latents(sample),
                    encoder_hidden_states=conditioning["prompt_embeds"],
                    pooled_projections=conditioning["pooled_prompt_embeds"],
                    timestep=sigma.to(sample.dtype),
                    img_ids=latent_image_ids(h, w, self.device, sample.dtype),
                    txt_ids=conditioning["txt_ids"][0],
                    guidance=guidance,
                    return_dict=False,
                )
            except StopForward as stop:
                return stop.output
        raise RuntimeError(
            "forward_to_layer: the FLUX transformer forward pass never called the requested layer."
        )


# --------------------------------------------------------------------------------------------------
# The tiny random FLUX-architecture model (builtins tiny-flux, tiny-flux-sae)
# --------------------------------------------------------------------------------------------------

TINY_FLUX_LAYER = "transformer_blocks.1"
"""The tiny model's default variant layer (its last dual-stream block)."""


@dataclass(frozen=True)
class TinyFluxConfig:
    """Architecture and seed of the tiny random FLUX-architecture model (same component types as FLUX.1)."""

    seed: int = 0
    image_size: int = 64
    num_layers: int = 2
    num_single_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    vae_norm_num_groups: int = 8
    latent_channels: int = 16
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 64
    t5_d_model: int = 32
    t5_layers: int = 1
    t5_heads: int = 4
    t5_d_ff: int = 64
    t5_max_length: int = 16
    guidance_embeds: bool = False

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_block_out_channels) - 1)


T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


def build_t5_word_tokenizer(words: Sequence[str], out_dir: str | Path, model_max_length: int = 16) -> Any:
    """Write a T5-style tokenizer (``tokenizers`` Unigram over ``▁word`` pieces + single letters, Metaspace,
    ``</s>`` appended; pad 0, eos 1, unk 2) as ``tokenizer.json`` + ``tokenizer_config.json``: FluxPipeline
    takes it as ``tokenizer_2`` (no sentencepiece needed). Every word of ``words`` is one token.

    Returns:
        The tokenizer re-loaded from ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import AutoTokenizer, T5TokenizerFast

    from ddr_core.tokenizer import normalize_words

    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in normalize_words(words)]
    pieces += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=model_max_length,
    )
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_path)
    return AutoTokenizer.from_pretrained(out_path)


def build_tiny_flux_transformer(config: TinyFluxConfig = TinyFluxConfig()) -> nn.Module:
    """The tiny ``FluxTransformer2DModel`` (seeded, float32, eval mode); schnell-like (no guidance embedding)
    unless ``config.guidance_embeds`` (dev-like)."""
    from diffusers import FluxTransformer2DModel

    from ddr_core.tiny_model import _seeded

    with _seeded(config.seed * 1000 + 11):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=config.latent_channels * PATCH * PATCH,
            num_layers=config.num_layers,
            num_single_layers=config.num_single_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.t5_d_model,
            pooled_projection_dim=config.text_hidden_size,
            guidance_embeds=config.guidance_embeds,
            axes_dims_rope=config.axes_dims_rope,
        ).eval()


def build_tiny_flux(out_dir: str | Path, config: TinyFluxConfig = TinyFluxConfig()) -> Path:
    """Build the tiny random FLUX-architecture model as a diffusers ``FluxPipeline`` folder, offline.

    Components (the types of FLUX.1-schnell): ``FluxTransformer2DModel`` (2 dual + 2 single blocks,
    hidden 32),
    ``AutoencoderKL`` with 16 latent channels and FLUX's scaling / shift factors (8x downscale), a tiny
    ``CLIPTextModel`` over the word tokenizer (:mod:`ddr_core.tokenizer`), a tiny ``T5EncoderModel`` over a
    T5-style word tokenizer (:func:`build_t5_word_tokenizer`), and ``FlowMatchEulerDiscreteScheduler``
    configured like schnell (shift 1, no dynamic shifting). Safetensors only; byte-identical for one config.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5Config, T5EncoderModel

    from ddr_core.tiny_model import _seeded, build_clip_text_encoder, build_sd_vae, tiny_vocabulary
    from ddr_core.tokenizer import build_word_tokenizer

    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    words = tiny_vocabulary()
    tokenizer = build_word_tokenizer(words, out_path / "tokenizer")
    tokenizer_2 = build_t5_word_tokenizer(words, out_path / "tokenizer_2", config.t5_max_length)
    vae = build_sd_vae(config, config.seed, scaling_factor=0.3611, seed_offset=12, shift_factor=0.1159,
                       use_quant_conv=False, use_post_quant_conv=False).eval()
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=config.t5_d_model,
        d_kv=config.t5_d_model // config.t5_heads,
        d_ff=config.t5_d_ff,
        num_layers=config.t5_layers,
        num_heads=config.t5_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(config.seed * 1000 + 13):
        text_encoder_2 = T5EncoderModel(t5_config).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
        ),
        vae=vae,
        text_encoder=build_clip_text_encoder(config, tokenizer, config.seed).eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=build_tiny_flux_transformer(config),
    )
    pipe.save_pretrained(out_path, safe_serialization=True)
    # save_pretrained rewrites the tokenizers through transformers; put the canonical files back on top.
    build_word_tokenizer(words, out_path / "tokenizer")
    build_t5_word_tokenizer(words, out_path / "tokenizer_2", config.t5_max_length)
    return out_path


def build_tiny_flux_sae(
    out_root: str | Path,
    layer_name: str = TINY_FLUX_LAYER,
    expansion_factor: int = 4,
    k: int = 8,
    seed: int = 0,
    config: TinyFluxConfig = TinyFluxConfig(),
) -> Path:
    """A random TopK SAE (SAeUron format) for a block of the tiny FLUX model, in ``out_root/<layer_name>/``
    (``d_in`` = the hidden size, 32; ``expansion_factor * 32`` features)."""
    from ddr_core.paths import check_name
    from ddr_core.sae import Sae, save_sae
    from ddr_core.tiny_model import _seeded

    width = config.hidden_size
    with _seeded(seed):
        sae = Sae.random(d_in=width, num_latents=width * expansion_factor, k=k, seed=seed)
    return Path(save_sae(sae, Path(out_root) / check_name(layer_name, "layer")))
