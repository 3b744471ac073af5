"""Regularisation of deep-dream latent optimisation: augmentation, penalties, gradient transforms.

Everything here works **per batch element**: a latent batch ``(batch, channels, height, width)``
holds independent optimisation problems (one per channel objective, timestep and seed), so every
penalty returns one value per element ``(batch,)``, every random augmentation parameter is drawn
per element (from that element's own ``torch.Generator`` when a list is given), and every gradient
transform normalises each element on its own. An element's result therefore never depends on which
other elements share its batch.

- :class:`LatentAugmentation` -- transformation robustness: random circular jitter (``torch.roll``
  semantics), rotation and zoom (bilinear resampling via ``F.affine_grid`` + ``F.grid_sample``,
  zeros outside), with presets ``level 0..3``.
- :func:`total_variation`, :func:`range_penalty`, :func:`moment_penalty` -- penalties ``-> (batch,)``.
- :func:`fourier_precondition` -- scales each gradient's spectrum by ``1 / (|f| + 1)`` (larger steps
  for low spatial frequencies) and restores each element's standard deviation.
- :func:`gaussian_smooth` and :func:`smoothing_sigma` -- Gaussian blur of the gradient with a
  sigma that decays linearly over the optimisation steps (sigma 0 is the identity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")

GeneratorArg: TypeAlias = "torch.Generator | Sequence[torch.Generator] | None"
"""One generator for the whole batch, one per element (batch-independent draws), or ``None``."""

AUGMENTATION_PRESETS: dict[int, tuple[int, float, float]] = {
    0: (0, 0.0, 1.0),
    1: (1, 5.0, 1.1),
    2: (8, 15.0, 1.2),
    3: (16, 45.0, 1.8),
}
"""Level -> ``(jitter_max pixels, rotate_max degrees, scale_max)``."""

_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------------------


def _uniform(batch: int, low: float, high: float, generator: GeneratorArg) -> torch.Tensor:
    """``(batch,)`` float64 uniform draws in ``[low, high]``; one draw per element generator."""
    if isinstance(generator, Sequence):
        if len(generator) != batch:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch}; pass one per element.")
        values = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generator])
    else:
        values = torch.rand(batch, generator=generator, dtype=torch.float64)
    return low + (high - low) * values


def _integers(batch: int, bound: int, generator: GeneratorArg) -> torch.Tensor:
    """``(batch,)`` int64 draws in ``[-bound, bound]``; one draw per element generator."""
    if isinstance(generator, Sequence):
        if len(generator) != batch:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch}; pass one per element.")
        return torch.cat([torch.randint(-bound, bound + 1, (1,), generator=g) for g in generator])
    return torch.randint(-bound, bound + 1, (batch,), generator=generator)


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def roll_per_element(latents: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    """Circular shift of each element by its own offsets, like ``torch.roll`` per element.

    Args:
        latents: ``(batch, channels, height, width)``.
        shift_y, shift_x: ``(batch,)`` integer shifts along height and width.

    Returns:
        ``(batch, channels, height, width)``; element ``b`` equals
        ``torch.roll(latents[b], (shift_y[b], shift_x[b]), dims=(1, 2))``.
    """
    batch, channels, height, width = latents.shape
    device = latents.device
    rows = (torch.arange(height, device=device)[None, :] - shift_y.to(device, non_blocking=True)[:, None]) % height  # (B, H)
    cols = (torch.arange(width, device=device)[None, :] - shift_x.to(device, non_blocking=True)[:, None]) % width  # (B, W)
    out = latents.gather(2, rows[:, None, :, None].expand(batch, channels, height, width))
    return out.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))


def rotate_scale(latents: torch.Tensor, angles_deg: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rotate each element about its centre by ``angles_deg[b]`` and zoom by ``scales[b]``.

    Bilinear resampling (``F.affine_grid`` + ``F.grid_sample``, ``align_corners=False``); samples
    falling outside the latent read zeros. The rotation is done in pixel units, so non-square
    latents are not sheared. ``scale > 1`` zooms in.

    Args:
        latents: ``(batch, channels, height, width)``.
        angles_deg: ``(batch,)`` rotation angles in degrees.
        scales: ``(batch,)`` zoom factors (> 0).

    Returns:
        ``(batch, channels, height, width)``, same dtype.
    """
    _, _, height, width = latents.shape
    radians = angles_deg.to(torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    inverse_scale = 1.0 / scales.to(torch.float64)
    # Output pixel p samples the input at R(-angle) p / scale; in normalised coordinates
    # (x / (W/2), y / (H/2)) that is D^-1 R(-angle) D / scale with D = diag(W/2, H/2).
    theta = torch.zeros(latents.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * inverse_scale
    theta[:, 0, 1] = sin * (height / width) * inverse_scale
    theta[:, 1, 0] = -sin * (width / height) * inverse_scale
    theta[:, 1, 1] = cos * inverse_scale
    compute_dtype = torch.float32 if latents.dtype in (torch.float16, torch.bfloat16) else latents.dtype
    grid = F.affine_grid(
        theta.to(device=latents.device, dtype=compute_dtype, non_blocking=True), list(latents.shape), align_corners=False
    )
    resampled = F.grid_sample(
        latents.to(compute_dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return resampled.to(latents.dtype)


@dataclass(frozen=True)
class AugmentationParams:
    """Per-element augmentation parameters, each ``(batch,)``: jitter in pixels, angle in degrees, zoom."""

    shift_y: torch.Tensor
    shift_x: torch.Tensor
    angles_deg: torch.Tensor
    scales: torch.Tensor


@dataclass(frozen=True)
class LatentAugmentation:
    """Transformation robustness for latents ``(batch, channels, height, width)``.

    Each element gets its own random circular jitter of up to ``jitter_max`` pixels per axis,
    rotation uniform in ``[-rotate_max, rotate_max]`` degrees and zoom uniform in
    ``[1, scale_max]``. With all three at their neutral values (level 0) the call is the identity.

    Attributes:
        jitter_max: Maximum circular shift in latent pixels (>= 0).
        rotate_max: Maximum rotation in degrees (>= 0).
        scale_max: Maximum zoom factor (>= 1).
    """

    jitter_max: int = 0
    rotate_max: float = 0.0
    scale_max: float = 1.0

    def __post_init__(self) -> None:
        if self.jitter_max < 0:
            raise ValueError(f"jitter_max must be >= 0, got {self.jitter_max}.")
        if self.rotate_max < 0:
            raise ValueError(f"rotate_max must be >= 0, got {self.rotate_max}.")
        if self.scale_max < 1.0:
            raise ValueError(f"scale_max must be >= 1 (1 means no zoom), got {self.scale_max}.")

    @classmethod
    def preset(
        cls,
        level: int,
        jitter_max: int | None = None,
        rotate_max: float | None = None,
        scale_max: float | None = None,
    ) -> LatentAugmentation:
        """Preset ``level`` (0-3: jitter 0/1/8/16 px, rotate 0/5/15/45 deg, scale 1.0/1.1/1.2/1.8);
        explicit values override the preset's."""
        if level not in AUGMENTATION_PRESETS:
            raise ValueError(f"augmentation level must be one of {sorted(AUGMENTATION_PRESETS)}, got {level}.")
        preset_jitter, preset_rotate, preset_scale = AUGMENTATION_PRESETS[level]
        return cls(
            jitter_max=preset_jitter if jitter_max is None else int(jitter_max),
            rotate_max=preset_rotate if rotate_max is None else float(rotate_max),
            scale_max=preset_scale if scale_max is None else float(scale_max),
        )

    @property
    def is_identity(self) -> bool:
        return self.jitter_max == 0 and self.rotate_max == 0 and self.scale_max == 1.0

    def sample(self, batch: int, generator: GeneratorArg = None) -> AugmentationParams:
        """Draw parameters for ``batch`` elements (from one generator each when a list is given).

        Draw order per element: jitter y, jitter x, angle, scale (only the enabled ones), so an
        element's parameters depend only on its own generator.
        """
        if isinstance(generator, Sequence):
            per_element = [self.sample(1, g) for g in generator]
            if len(per_element) != batch:
                raise ValueError(f"Got {len(per_element)} generators for a batch of {batch}.")
            return AugmentationParams(
                *(torch.cat([getattr(p, name) for p in per_element])
                  for name in ("shift_y", "shift_x", "angles_deg", "scales"))
            )
        zeros = torch.zeros(batch, dtype=torch.long)
        shift_y = _integers(batch, self.jitter_max, generator) if self.jitter_max else zeros
        shift_x = _integers(batch, self.jitter_max, generator) if self.jitter_max else zeros
        angles = (
            _uniform(batch, -self.rotate_max, self.rotate_max, generator)
            if self.rotate_max
            else torch.zeros(batch, dtype=torch.float64)
        )
        scales = (
            _uniform(batch, 1.0, self.scale_max, generator)
            if self.scale_max != 1.0
            else torch.ones(batch, dtype=torch.float64)
        )
        return AugmentationParams(shift_y, shift_x, angles, scales)

    def apply(self, latents: torch.Tensor, params: AugmentationParams) -> torch.Tensor:
        """Apply given parameters: jitter first, then rotation + zoom. ``(B, C, H, W) -> (B, C, H, W)``."""
        out = latents
        if bool((params.shift_y != 0).any() or (params.shift_x != 0).any()):
            out = roll_per_element(out, params.shift_y, params.shift_x)
        if bool((params.angles_deg != 0).any() or (params.scales != 1.0).any()):
            out = rotate_scale(out, params.angles_deg, params.scales)
        return out

    def __call__(self, latents: torch.Tensor, generator: GeneratorArg = None) -> torch.Tensor:
        """Augment ``latents`` ``(batch, channels, height, width)`` with freshly drawn parameters."""
        if self.is_identity:
            return latents
        return self.apply(latents, self.sample(latents.shape[0], generator))


# --------------------------------------------------------------------------------------------------
# Penalties, each (batch, channels, height, width) -> (batch,)
# --------------------------------------------------------------------------------------------------


def _check_4d(latents: torch.Tensor, name: str) -> None:
    if latents.ndim != 4:
        raise ValueError(f"{name} expects (batch, channels, height, width), got shape {tuple(latents.shape)}.")


def total_variation(latents: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per element: mean ``|x[h+1] - x[h]|`` + mean ``|x[w+1] - x[w]|``.

    Means run over ``(channels, height-1, width)`` and ``(channels, height, width-1)``.

    Args:
        latents: ``(batch, channels, height, width)``.

    Returns:
        ``(batch,)``.
    """
    _check_4d(latents, "total_variation")
    vertical = (latents[:, :, 1:, :] - latents[:, :, :-1, :]).abs().flatten(1).mean(dim=1)
    horizontal = (latents[:, :, :, 1:] - latents[:, :, :, :-1]).abs().flatten(1).mean(dim=1)
    return vertical + horizontal


def range_penalty(latents: torch.Tensor, threshold: float = 3.0) -> torch.Tensor:
    """Quadratic penalty on values beyond ``threshold`` in magnitude: mean ``relu(|x| - threshold)**2``.

    Zero when every value lies in ``[-threshold, threshold]``.

    Args:
        latents: ``(batch, channels, height, width)``.

    Returns:
        ``(batch,)``, mean over ``(channels, height, width)``.
    """
    _check_4d(latents, "range_penalty")
    return F.relu(latents.abs() - threshold).pow(2).flatten(1).mean(dim=1)


def moment_penalty(latents: torch.Tensor) -> torch.Tensor:
    """Distance of each element's moments from a standard normal: ``|mean| + |std - 1|``.

    Mean and (unbiased) standard deviation run over ``(channels, height, width)``.

    Args:
        latents: ``(batch, channels, height, width)``.

    Returns:
        ``(batch,)``.
    """
    _check_4d(latents, "moment_penalty")
    flat = latents.flatten(1)
    return flat.mean(dim=1).abs() + (flat.std(dim=1) - 1.0).abs()


# --------------------------------------------------------------------------------------------------
# Gradient transforms, each (batch, channels, height, width) -> same shape
# --------------------------------------------------------------------------------------------------


def frequency_scale(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``1 / (|f| + 1)`` on the ``rfft2`` grid ``(height, width // 2 + 1)``, ``|f|`` in cycles per image."""
    fy = torch.fft.fftfreq(height, d=1.0 / height, device=device)
    fx = torch.fft.rfftfreq(width, d=1.0 / width, device=device)
    magnitude = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return 1.0 / (magnitude + 1.0)


def fourier_precondition(grad: torch.Tensor) -> torch.Tensor:
    """Scale each element's gradient spectrum by ``1 / (|f| + 1)``, then restore its standard deviation.

    Low spatial frequencies get relatively larger updates, which suppresses high-frequency noise
    in the optimised latents. The result of element ``b`` has the standard deviation (over
    ``(channels, height, width)``) of ``grad[b]``; an all-zero gradient stays zero.

    Args:
        grad: ``(batch, channels, height, width)``.

    Returns:
        ``(batch, channels, height, width)``, dtype of ``grad``.
    """
    _check_4d(grad, "fourier_precondition")
    height, width = grad.shape[-2:]
    work = grad.float()
    spectrum = torch.fft.rfft2(work)
    filtered = torch.fft.irfft2(spectrum * frequency_scale(height, width, grad.device), s=(height, width))
    original_std = work.flatten(1).std(dim=1)
    filtered_std = filtered.flatten(1).std(dim=1)
    factor = original_std / (filtered_std + _EPS)
    return (filtered * factor[:, None, None, None]).to(grad.dtype)


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian ``(kernel_size,)`` centred on the middle tap, in ``dtype`` (float32 if None)."""
    dtype = torch.float32 if dtype is None else dtype
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2.0
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(dtype)


def gaussian_smooth(grad: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur of each channel of each element (reflect padding).

    ``sigma <= 0`` returns ``grad`` unchanged. The kernel is shrunk (to an odd size) where the
    latent is too small for reflect padding.

    Args:
        grad: ``(batch, channels, height, width)``.
        sigma: Standard deviation in pixels.
        kernel_size: Odd number of taps.

    Returns:
        ``(batch, channels, height, width)``.
    """
    _check_4d(grad, "gaussian_smooth")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}.")
    if sigma <= 0:
        return grad
    batch, channels, height, width = grad.shape
    max_pad = max(min(height, width) - 1, 0)
    pad = min(kernel_size // 2, max_pad)
    if pad == 0:
        return grad
    size = 2 * pad + 1
    work_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    kernel = gaussian_kernel1d(size, sigma, work_dtype).to(grad.device, non_blocking=True)
    x = grad.to(work_dtype).reshape(batch * channels, 1, height, width)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, size))
    x = F.conv2d(x, kernel.view(1, 1, size, 1))
    return x.reshape(batch, channels, height, width).to(grad.dtype)


def smoothing_sigma(step: int, num_steps: int, sigma_start: float, sigma_end: float) -> float:
    """Sigma at ``step`` (0-based) of ``num_steps``: linear from ``sigma_start`` to ``sigma_end``."""
    progress = step / max(num_steps - 1, 1)
    return float(sigma_start + progress * (sigma_end - sigma_start))
