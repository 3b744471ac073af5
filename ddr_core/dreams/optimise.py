"""One optimisation batch of dreams (:func:`optimise_dreams`; one step is described in :mod:`ddr_core.dreams`)
and the clean re-measurement of latents (:func:`measure_activations`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ddr_core.dreams.config import STAT_NAMES, DreamConfig, DreamObjective
from ddr_core.dreams.parameterisations import make_parameterisation
from ddr_core.hooks import HookPoint
from ddr_core.lazy_imports import lazy_module, no_grad
from ddr_core.regularisation import (
    fourier_precondition,
    gaussian_smooth,
    moment_penalty,
    range_penalty,
    smoothing_sigma,
    total_variation,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")


@dataclass
class DreamBatchResult:
    """Result of :func:`optimise_dreams` for ``B`` elements.

    Attributes:
        latents: ``(B, 4, h, w)`` float32 CPU final latents (failed elements: last finite value): the pictured
            clean latents of the parameterisation (:mod:`ddr_core.dreams.parameterisations`).
        initial_latents: ``(B, 4, h, w)`` the pictured clean latents of the start parameters (the start
            latents themselves for ``parameterisation: latent``): what the quality check compares with.
        history: stat name (``activation, tv, range, moment, loss``) -> ``(num_steps, B)`` float64;
            NaN where an element did not run that step. Penalties are unweighted; ``loss`` is the
            weighted total of the element (with ``objective: pre_activation``, minus the pre-activation).
            ``activation`` is the unit's real activation, measured on the augmented, noised input.
        snapshots: step -> ``(B, 4, h, w)`` CPU latents at the start of that step.
        failed: per element ``None`` or the reason it stopped.
        failed_step: per element the step it failed at, or ``None``.
    """

    latents: torch.Tensor
    history: dict[str, np.ndarray]
    snapshots: dict[int, torch.Tensor]
    failed: list[str | None]
    failed_step: list[int | None]
    initial_latents: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def final_activation(self) -> np.ndarray:
        """``(B,)`` the last finite activation of each element (NaN when none)."""
        activation = self.history["activation"]
        out = np.full(activation.shape[1], np.nan)
        for element in range(activation.shape[1]):
            finite = np.nonzero(np.isfinite(activation[:, element]))[0]
            if finite.size:
                out[element] = activation[finite[-1], element]
        return out

    def steps_run(self, element: int) -> np.ndarray:
        """Steps that element ``element`` ran (its stats are recorded at those)."""
        return np.nonzero(~np.isnan(self.history["loss"][:, element]))[0]


def element_generators(seeds: Sequence[int], device: str = "cpu") -> list[torch.Generator]:
    """One CPU generator per element, seeded with ``seeds[i]``."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def element_seed(random_seed: int, channel: int, timestep: int, seed: int, draw: int = 0) -> int:
    """The random stream seed of one element: a function of its identity only."""
    state = np.random.SeedSequence([int(random_seed), int(channel), int(timestep), int(seed), int(draw)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _resolve_generators(generator: Any, batch: int) -> list[torch.Generator]:
    if isinstance(generator, Sequence) and not isinstance(generator, str):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} elements; pass one per element")
        return list(generator)
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (batch,), generator=source).tolist()
    return element_generators(seeds)


def _check_timesteps(timesteps: torch.Tensor, batch: int, total: int) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    if timesteps.numel() != batch:
        raise ValueError(f"timesteps must be (batch,) = ({batch},), got {tuple(timesteps.shape)}")
    if batch and (int(timesteps.min()) < 0 or int(timesteps.max()) >= total):
        raise ValueError(f"timesteps must lie in [0, {total}) (the scheduler's train timesteps), got "
                         f"{sorted(set(timesteps.tolist()))}")
    return timesteps


def optimise_dreams(
    pipe: Any,
    layer: HookPoint | nn.Module | str,
    objective: DreamObjective,
    init_latents: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    config: DreamConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    snapshot_every: int | None = None,
    maco_magnitude: torch.Tensor | None = None,
) -> DreamBatchResult:
    """Optimise ``B`` dream latents at once (see the module docstring for one step).

    Args:
        pipe: a :class:`~ddr_core.families.ModelFamily` or a loaded diffusers pipeline.
        layer: the target hook point (:meth:`~ddr_core.families.ModelFamily.hook_point`), layer module or dotted name.
        objective: what each element maximises (``len(objective) == B``).
        init_latents: ``(B, 4, h, w)`` starting latents (e.g. priors).
        timesteps: ``(B,)`` integer timestep per element.
        config: optimisation parameters.
        generator: one generator per element (an element's draws then depend only on its own
            generator, so results do not depend on the batch), or one generator from which
            per-element generators are derived, or ``None`` (seed 0).
        snapshot_every: overrides ``config.snapshot_every`` (0: no snapshots).
        maco_magnitude: ``parameterisation: maco``: the reference amplitude spectrum
            (:func:`~ddr_core.dreams.parameterisations.reference_magnitude`, computed once per run by the
            caller); ``None``: computed here.

    Returns:
        A :class:`DreamBatchResult`.
    """
    from ddr_core.families import as_model

    start = time.monotonic()
    model = as_model(pipe)
    layer_module = model.hook_point(layer) if isinstance(layer, str) else layer
    if init_latents.ndim != 4:
        raise ValueError(f"init_latents must be (batch, channels, height, width), got {tuple(init_latents.shape)}")
    batch = init_latents.shape[0]
    if len(objective) != batch:
        raise ValueError(f"objective has {len(objective)} elements but init_latents has {batch}")
    timesteps = _check_timesteps(timesteps, batch, model.num_train_timesteps)
    generators = _resolve_generators(generator, batch)
    every = config.snapshot_every if snapshot_every is None else snapshot_every
    device = model.device
    model_dtype = model.dtype
    augmentation = config.augmentation()
    context = model.encode_prompt("")
    timesteps_device = timesteps.to(device)

    start_latents = init_latents.detach().to(device=device, dtype=torch.float32)
    param = make_parameterisation(config, model, timesteps, generators, context, maco_magnitude)
    latents = param.init(start_latents).detach().clone().requires_grad_(True)  # the optimised parameters
    initial_pictures = start_latents.cpu().clone() if param.name == "latent" else param.picture(latents).cpu()
    optimizer = torch.optim.AdamW([latents], lr=config.learning_rate, weight_decay=config.weight_decay)
    history = {name: np.full((config.num_steps, batch), np.nan) for name in STAT_NAMES}
    snapshots: dict[int, torch.Tensor] = {}
    failed: list[str | None] = [None] * batch
    failed_step: list[int | None] = [None] * batch
    active = torch.ones(batch, dtype=torch.bool)
    initial_finite = torch.isfinite(latents.detach()).flatten(1).all(dim=1).cpu()
    for element in torch.nonzero(~initial_finite).flatten().tolist():
        failed[element], failed_step[element] = "non-finite initial latent", 0
        active[element] = False

    for step in range(config.num_steps):
        rows = torch.nonzero(active).flatten()
        if rows.numel() == 0:
            break
        if every and step % every == 0:
            snapshots[step] = (latents.detach().float().cpu().clone() if param.name == "latent"
                               else param.picture(latents).cpu())
        rows_device = rows.to(device, non_blocking=True)  # a few indices up; no wait for the GPU
        element_gens = [generators[i] for i in rows.tolist()]

        rendered = param.render(latents[rows_device], rows, augmentation, element_gens)  # gradient to `latents`
        output = model.forward_to_layer(
            layer_module, rendered.layer_input.to(model_dtype), timesteps_device[rows_device],
            context.expand(rows.numel()),
        )
        maximised, activation = objective.targets(output, rows, config.objective)
        current = rendered.clean  # the picture; None (sampler): no penalty
        zero = torch.zeros_like(activation)
        tv = total_variation(current) if current is not None else zero
        out_of_range = range_penalty(current, config.range_penalty_threshold) if current is not None else zero
        moments = moment_penalty(current) if current is not None else zero
        loss = (
            -maximised
            + config.total_variation_weight * tv
            + config.range_penalty_weight * out_of_range
            + config.moment_penalty_weight * moments
        )
        finite = torch.isfinite(loss) & torch.isfinite(activation) & torch.isfinite(maximised)
        (grad,) = torch.autograd.grad(torch.where(finite, loss, torch.zeros_like(loss)).sum(), latents)
        element_grad = grad[rows_device]
        grad_finite = torch.isfinite(element_grad).flatten(1).all(dim=1)
        ok = finite & grad_finite

        values = {"activation": activation, "tv": tv, "range": out_of_range, "moment": moments, "loss": loss}
        # the step's statistics and finite flags reach the CPU in one read (on a GPU one sync, not six)
        host = torch.stack([*(value.detach().double() for value in values.values()), ok.double()]).cpu()
        for index, name in enumerate(values):
            history[name][step, rows.numpy()] = host[index].numpy()
        ok_cpu = host[-1] != 0
        for position in torch.nonzero(~ok_cpu).flatten().tolist():
            element = int(rows[position])
            what = "activation" if not bool(torch.isfinite(activation[position])) else (
                "loss" if not bool(finite[position]) else "gradient")
            failed[element], failed_step[element] = f"non-finite {what} at step {step}", step
            active[element] = False

        element_grad = torch.where(ok[:, None, None, None], element_grad, torch.zeros_like(element_grad))
        if config.fourier_preconditioning and param.transforms_gradient:
            element_grad = fourier_precondition(element_grad)
        sigma = smoothing_sigma(
            step, config.num_steps, config.gradient_smoothing_sigma_start, config.gradient_smoothing_sigma_end
        )
        if param.transforms_gradient:
            element_grad = gaussian_smooth(element_grad, sigma, config.gradient_smoothing_kernel_size)
        full_grad = torch.zeros_like(latents)
        full_grad[rows_device] = element_grad

        before = latents.detach().clone()
        latents.grad = full_grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            stepped_finite = torch.isfinite(latents).flatten(1).all(dim=1).cpu()
            for element in torch.nonzero(active & ~stepped_finite).flatten().tolist():
                failed[element], failed_step[element] = f"non-finite latent after step {step}", step
                active[element] = False
            frozen = (~active).to(device, non_blocking=True)
            latents[frozen] = before[frozen]  # failed / finished elements keep their last finite latent

    return DreamBatchResult(
        latents=latents.detach().float().cpu() if param.name == "latent" else param.picture(latents).cpu(),
        initial_latents=initial_pictures,
        history=history,
        snapshots=snapshots,
        failed=failed,
        failed_step=failed_step,
        seconds=time.monotonic() - start,
    )


@no_grad
def measure_activations(
    pipe: Any,
    layer: HookPoint | nn.Module | str,
    objective: DreamObjective,
    latents: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    noise_generators: Sequence[Sequence[torch.Generator]] | None = None,
) -> torch.Tensor:
    """Activation of each element without augmentation, averaged over noise draws.

    Args:
        latents: ``(B, 4, h, w)``.
        timesteps: ``(B,)``.
        noise_generators: ``None`` for one clean forward per element; otherwise per draw a list of
            ``B`` generators giving the scheduler noise added at the element's timestep.

    Returns:
        ``(B,)`` float64 CPU; NaN where the latent is not finite.
    """
    from ddr_core.families import as_model

    model = as_model(pipe)
    layer_module = model.hook_point(layer) if isinstance(layer, str) else layer
    batch = latents.shape[0]
    timesteps = _check_timesteps(timesteps, batch, model.num_train_timesteps).to(model.device)
    context = model.encode_prompt("").expand(batch)
    clean = latents.to(device=model.device, dtype=torch.float32)
    draws = noise_generators if noise_generators else [None]
    total = torch.zeros(batch, dtype=torch.float64)
    for generators in draws:
        sample = clean
        if generators is not None:
            noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g) for g in generators])
            sample = model.add_noise(clean, noise.to(model.device), timesteps)
        output = model.forward_to_layer(layer_module, sample.to(model.dtype), timesteps, context)
        total += objective.activations(output).double().cpu()
    return total / len(draws)
