"""What a dream optimises (Lucent style: the parameterisation, apart from the objective and the transforms).

A :class:`Parameterisation` maps the optimised parameters of each batch element to

- ``clean``: the clean, image-shaped latent the element stands for (its picture; the penalties act on it), and
- ``layer_input``: what the denoiser sees at the element's timestep ``t`` when the objective is read.

``DreamConfig.parameterisation`` picks one:

- ``latent`` (default, today's dreams): the parameters *are* the clean latent; the layer sees it augmented and
  (``see_through_schedule_noise``) re-noised to ``t`` with fresh schedule noise each step.
- ``x0_prediction``: the parameters are a latent ``z``; the picture is the denoiser's x0-prediction from ``z``
  noised to the projection timestep ``s`` (``x0_projection_timestep``, default ``t``) with a noise draw fixed per
  element: ``x0 = D(s_s z + n_s eps, s)``. The layer sees ``x0`` augmented and re-noised to ``t`` like a latent
  dream. The denoiser maps anything to what it believes a clean image is, so the picture stays near the model's
  image manifold (DDS / score-distillation-like projection, one denoiser call).
- ``sampler``: the parameters are the sampler's initial noise ``x_T``; ``sampler_steps`` deterministic DDIM steps
  (eta 0, with the model's own predictions, empty prompt, no guidance) carry it down to ``t`` and the layer sees
  the trajectory's own ``x_t`` (no extra noise, no augmentation). The gradient flows back through every
  denoiser call of the trajectory (``gradient_checkpointing``: each call's activations are recomputed in the
  backward pass instead of stored). The picture is the end of the trajectory: ``sampler_steps`` further DDIM
  steps from ``t`` to 0 (no gradient). Needs ``start: noise``. The activation in ``stats.parquet`` is the one
  along the trajectory; the quality check re-measures the picture re-noised to ``t`` like any other dream.
- ``maco``: magnitude-constrained optimisation (MACO, Fel et al. 2023): the parameters are a phase spectrum;
  the latent is ``ifft2(M * exp(i phi))`` with the magnitude ``M`` fixed to the mean amplitude spectrum of the
  model's own samples (``maco_reference_samples`` DDIM samples from seeded noise, :func:`reference_magnitude`)
  and ``phi`` the Hermitian-antisymmetric part of the optimised phase, so the latent is real and its amplitude
  spectrum is ``M`` exactly. Self-conjugate frequencies (DC, Nyquist) have no phase: their sign is the start
  latent's. The start phase is the start latent's.

The gradient transforms of the latent dreams (Fourier preconditioning, Gaussian smoothing) act on the gradient of
``latent`` and ``x0_prediction`` parameters (image-shaped latents), not on a phase or an initial noise.

Only DDPM-style UNet families (``sd``, ``sdxl``: epsilon or v prediction) can run the ``x0_prediction``,
``sampler`` and ``maco`` parameterisations (:func:`check_parameterisation`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddr_core.lazy_imports import lazy_module, no_grad

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

PARAMETERISATIONS: tuple[str, ...] = ("latent", "x0_prediction", "sampler", "maco")


@dataclass
class Rendered:
    """One step's rendering of ``n`` elements: ``clean`` (n, C, h, w) the pictured latent (``None``: not
    computed with a gradient, e.g. the sampler's), ``layer_input`` (n, C, h, w) what the denoiser sees at ``t``."""

    clean: torch.Tensor | None
    layer_input: torch.Tensor


# --------------------------------------------------------------------------------------------------
# The denoiser's prediction (DDPM-style UNet families)
# --------------------------------------------------------------------------------------------------


def check_parameterisation(model: Any, name: str) -> None:
    """Raise ``ValueError`` when ``model``'s family cannot run the parameterisation ``name``."""
    if name not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation must be one of {list(PARAMETERISATIONS)}, got {name!r}")
    if name == "latent":
        return
    scheduler = getattr(getattr(model, "pipe", None), "scheduler", None)
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if getattr(model.pipe, "unet", None) is None or getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"parameterisation {name!r} needs a DDPM-style UNet family (sd, sdxl); the "
                         f"{getattr(model, 'name', type(model).__name__)} family has none: use parameterisation: latent")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"parameterisation {name!r} supports epsilon or v_prediction schedulers, got "
                         f"prediction_type {prediction!r}: use parameterisation: latent")


def alpha_bar(model: Any, timesteps: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``alpha_bar_t`` of the scheduler for each timestep ``(n,)``, ``dtype`` (float32 if None) on the model's device."""
    dtype = torch.float32 if dtype is None else dtype
    table = model.pipe.scheduler.alphas_cumprod.to(dtype=dtype)
    index = torch.as_tensor(timesteps, dtype=torch.long)
    # indexed where the timesteps are (no read of device timesteps by the host); copies up never wait for the GPU
    return table.to(index.device, non_blocking=True)[index].to(model.device, non_blocking=True)


def model_output(model: Any, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
    """The whole denoiser's output (epsilon or v) for image-shaped ``sample`` at per-row ``timesteps``."""
    kwargs: dict[str, Any] = {}
    if hasattr(model, "added_cond_kwargs"):
        scale = model.vae_scale_factor
        kwargs["added_cond_kwargs"] = model.added_cond_kwargs(conditioning, sample.shape[-2] * scale,
                                                              sample.shape[-1] * scale)
    out = model.denoiser(sample.to(model.dtype), timesteps.to(model.device, non_blocking=True),
                         encoder_hidden_states=conditioning["prompt_embeds"], return_dict=False, **kwargs)[0]
    return out.to(sample.dtype)


def predict_x0_eps(model: Any, sample: torch.Tensor, timesteps: torch.Tensor,
                   conditioning: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` predicted by the denoiser from ``x_t = sample`` (DDIM's ``pred_original_sample`` and noise)."""
    ab = alpha_bar(model, timesteps, sample.dtype)[:, None, None, None]
    a, b = ab.sqrt(), (1 - ab).sqrt()
    out = model_output(model, sample, timesteps, conditioning)
    if model.pipe.scheduler.config.prediction_type == "v_prediction":
        return a * sample - b * out, b * sample + a * out
    return (sample - b * out) / a.clamp_min(1e-8), out


def ddim_step(model: Any, sample: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              conditioning: Any) -> torch.Tensor:
    """One deterministic DDIM step (eta 0) from ``x_t`` to ``x_{t_prev}`` per row."""
    x0, eps = predict_x0_eps(model, sample, t, conditioning)
    ab_prev = alpha_bar(model, t_prev, sample.dtype)[:, None, None, None]
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


def descent_grid(start: torch.Tensor, end: torch.Tensor, steps: int) -> torch.Tensor:
    """``(steps + 1, n)`` integer timesteps from ``start`` down to ``end`` per row in equal jumps (rounded)."""
    fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)[:, None]
    grid = start.double()[None, :] + (end.double() - start.double())[None, :] * fractions
    return grid.round().long()


def run_trajectory(model: Any, x: torch.Tensor, grid: torch.Tensor, conditioning: Any,
                   use_checkpoint: bool) -> torch.Tensor:
    """DDIM along ``grid`` (``(k + 1, n)``: row 0 the start timesteps); the sample at ``grid[-1]``."""
    for i in range(grid.shape[0] - 1):
        t, t_prev = grid[i].to(model.device, non_blocking=True), grid[i + 1].to(model.device, non_blocking=True)
        if use_checkpoint and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(ddim_step, model, x, t, t_prev, conditioning, use_reentrant=False)
        else:
            x = ddim_step(model, x, t, t_prev, conditioning)
    return x


# --------------------------------------------------------------------------------------------------
# Parameterisations
# --------------------------------------------------------------------------------------------------


class Parameterisation(ABC):
    """Maps a batch's optimised parameters to pictures and layer inputs (see the module docstring)."""

    name: str = ""
    transforms_gradient: bool = False  # Fourier preconditioning / smoothing apply to the parameter gradient

    def __init__(self, model: Any, timesteps: torch.Tensor, generators: Sequence[torch.Generator],
                 conditioning: Any, config: Any):
        self.model, self.timesteps, self.generators = model, timesteps.to(model.device), list(generators)
        self.conditioning, self.config = conditioning, config

    def context(self, rows: torch.Tensor) -> Any:
        return self.conditioning.expand(int(rows.numel()))

    @abstractmethod
    def init(self, start: torch.Tensor) -> torch.Tensor:
        """The parameters ``(B, ...)`` of the start latents ``(B, C, h, w)``."""

    @abstractmethod
    def render(self, params: torch.Tensor, rows: torch.Tensor, augmentation: Any,
               generators: Sequence[torch.Generator]) -> Rendered:
        """One step's :class:`Rendered` of the elements ``rows`` (``params`` already indexed by ``rows``);
        ``generators``: the elements' own random streams (augmentation, schedule noise)."""

    @no_grad
    def picture(self, params: torch.Tensor) -> torch.Tensor:
        """The clean latents ``(B, C, h, w)`` of all elements (the images written), without gradient."""
        rows = torch.arange(params.shape[0])
        rendered = self._clean(params, rows)
        return rendered.detach().float()

    @abstractmethod
    def _clean(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The clean latents of ``rows`` (``params`` indexed by ``rows``)."""

    def _noised(self, clean: torch.Tensor, rows: torch.Tensor, augmentation: Any,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Today's path from a clean latent to the layer: augmentation, then (optionally) schedule noise at t."""
        augmented = augmentation(clean, list(generators))
        if self.config.see_through_schedule_noise:
            noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g) for g in generators])
            augmented = self.model.add_noise(augmented, noise.to(self.model.device, non_blocking=True),
                                             self.timesteps[rows.to(self.model.device, non_blocking=True)])
        return augmented


class LatentParameterisation(Parameterisation):
    """The clean latent itself (today's dreams; byte-identical random streams)."""

    name = "latent"
    transforms_gradient = True

    def init(self, start: torch.Tensor) -> torch.Tensor:
        return start.clone()

    def _clean(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return params

    def render(self, params, rows, augmentation, generators) -> Rendered:
        return Rendered(params, self._noised(params, rows, augmentation, generators))


class X0PredictionParameterisation(Parameterisation):
    """The denoiser's x0-prediction from the parameter latent noised to ``s`` with a per-element fixed draw."""

    name = "x0_prediction"
    transforms_gradient = True

    def __init__(self, model, timesteps, generators, conditioning, config):
        super().__init__(model, timesteps, generators, conditioning, config)
        fixed = config.x0_projection_timestep
        self.projection = self.timesteps.clone() if fixed is None else torch.full_like(self.timesteps, int(fixed))
        self.projection_noise: torch.Tensor | None = None

    def init(self, start: torch.Tensor) -> torch.Tensor:
        # the projection noise: fixed per element, from a stream of its own (the element's seed + 1)
        self.projection_noise = torch.cat([
            torch.randn((1, *start.shape[1:]), generator=torch.Generator().manual_seed((g.initial_seed() + 1) % 2**63))
            for g in self.generators]).to(self.model.device)
        return start.clone()

    def _clean(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.projection_noise is None:
            raise RuntimeError("X0PredictionParameterisation.init must run before rendering")
        rows_device = rows.to(self.model.device, non_blocking=True)
        noise = self.projection_noise[rows_device]
        s = self.projection[rows_device]
        noised = self.model.add_noise(params, noise, s)
        x0, _ = predict_x0_eps(self.model, noised, s, self.context(rows))
        return x0

    def render(self, params, rows, augmentation, generators) -> Rendered:
        clean = self._clean(params, rows)
        return Rendered(clean, self._noised(clean, rows, augmentation, generators))


class SamplerParameterisation(Parameterisation):
    """The sampler's initial noise, carried by DDIM down to ``t`` (the layer sees that ``x_t``)."""

    name = "sampler"

    def __init__(self, model, timesteps, generators, conditioning, config):
        super().__init__(model, timesteps, generators, conditioning, config)
        top = torch.full_like(self.timesteps.cpu(), model.num_train_timesteps - 1)
        self.to_t = descent_grid(top, self.timesteps.cpu(), config.sampler_steps)
        self.to_zero = descent_grid(self.timesteps.cpu(), torch.zeros_like(top), config.sampler_steps)

    def init(self, start: torch.Tensor) -> torch.Tensor:
        return start.clone()  # x_T: the initial noise (init_noise_sigma is 1 for DDPM-style schedulers)

    def at_t(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return run_trajectory(self.model, params, self.to_t[:, rows.cpu()], self.context(rows),
                              self.config.gradient_checkpointing)

    def _clean(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        x_t = self.at_t(params, rows)
        x_0 = run_trajectory(self.model, x_t, self.to_zero[:, rows.cpu()], self.context(rows), False)
        x0, _ = predict_x0_eps(self.model, x_0, self.to_zero[-1, rows.cpu()], self.context(rows))
        return x0

    def render(self, params, rows, augmentation, generators) -> Rendered:
        return Rendered(None, self.at_t(params, rows))


def hermitian_flip(x: torch.Tensor) -> torch.Tensor:
    """``x[..., -k]`` for every frequency ``k`` of the last two (fft2) axes."""
    return torch.roll(torch.flip(x, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


def self_conjugate_mask(height: int, width: int, device: Any = "cpu") -> torch.Tensor:
    """``(height, width)`` bool: the frequencies equal to their own negative (DC and the Nyquist ones)."""
    ky = torch.arange(height, device=device)
    kx = torch.arange(width, device=device)
    return ((ky[:, None] * 2) % height == 0) & ((kx[None, :] * 2) % width == 0)


def maco_latent(phase: torch.Tensor, magnitude: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The real latent ``(B, C, h, w)`` whose 2-D amplitude spectrum is ``magnitude`` (``(C, h, w)``, symmetric)
    and whose phase is the antisymmetric part of ``phase`` (self-conjugate frequencies: ``signs`` (B, C, h, w))."""
    antisymmetric = (phase - hermitian_flip(phase)) / 2
    spectrum = magnitude * signs * torch.exp(1j * antisymmetric)
    return torch.fft.ifft2(spectrum, norm="ortho").real


@no_grad
def reference_magnitude(model: Any, samples: int, steps: int, seed: int = 0) -> torch.Tensor:
    """The mean amplitude spectrum ``(C, h, w)`` (``ortho`` fft2) of ``samples`` of the model's own images:
    DDIM (``steps`` steps, empty prompt, no guidance) from noise seeded ``seed, seed + 1, ...``; symmetric in
    ``k -> -k`` like the spectrum of any real latent."""
    noise = model.initial_latents(list(range(seed, seed + samples)), *model.default_size).to(model.device)
    top = torch.full((samples,), model.num_train_timesteps - 1, dtype=torch.long)
    grid = descent_grid(top, torch.zeros_like(top), steps)
    context = model.encode_prompt("").expand(samples)
    x = run_trajectory(model, noise, grid, context, False)
    x0, _ = predict_x0_eps(model, x, grid[-1], context)
    magnitude = torch.fft.fft2(x0, norm="ortho").abs().mean(dim=0)
    return (magnitude + hermitian_flip(magnitude)) / 2


class MacoParameterisation(Parameterisation):
    """Phase with a fixed amplitude spectrum (MACO)."""

    name = "maco"

    def __init__(self, model, timesteps, generators, conditioning, config, magnitude: torch.Tensor | None = None):
        super().__init__(model, timesteps, generators, conditioning, config)
        if magnitude is None:
            magnitude = reference_magnitude(model, config.maco_reference_samples, config.maco_reference_steps,
                                            config.random_seed)
        self.magnitude = magnitude.to(model.device)
        self.signs: torch.Tensor | None = None

    def init(self, start: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.fft2(start.float(), norm="ortho")
        mask = self_conjugate_mask(*start.shape[-2:], device=start.device)
        real_sign = torch.where(spectrum.real < 0, -1.0, 1.0)
        self.signs = torch.where(mask, real_sign, torch.ones_like(real_sign)).to(self.model.device)
        return torch.angle(spectrum)

    def _clean(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.signs is None:
            raise RuntimeError("MacoParameterisation.init must run before rendering")
        return maco_latent(params, self.magnitude, self.signs[rows.to(self.model.device)])

    def render(self, params, rows, augmentation, generators) -> Rendered:
        clean = self._clean(params, rows)
        return Rendered(clean, self._noised(clean, rows, augmentation, generators))


def make_parameterisation(config: Any, model: Any, timesteps: torch.Tensor, generators: Sequence[torch.Generator],
                          conditioning: Any, magnitude: torch.Tensor | None = None) -> Parameterisation:
    """The :class:`Parameterisation` named by ``config.parameterisation`` for one batch (``magnitude``: MACO's
    reference amplitude spectrum, computed once per run by the caller; ``None``: computed here)."""
    name = config.parameterisation
    check_parameterisation(model, name)
    if name == "maco":
        return MacoParameterisation(model, timesteps, generators, conditioning, config, magnitude)
    kinds = {"latent": LatentParameterisation, "x0_prediction": X0PredictionParameterisation,
             "sampler": SamplerParameterisation}
    return kinds[name](model, timesteps, generators, conditioning, config)

