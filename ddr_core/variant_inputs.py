"""What a per-variant stage checks and loads before it works, in one place for every stage.

The ``*_for_variant`` functions (priors, dreams, feature concepts, ...) all start the same way: the variant
must be declared, the requested channels must lie in its width, the model / SAE folders must still hold
the weights the variant was captured with, the output folder must not be reached through a link, and then
the model (:func:`ddr_core.families.load_model`) and the variant's basis (:func:`ddr_core.basis.load_basis`)
are loaded. Each stage adds its own upstream checks (statistics tables, priors) between the cheap checks
and the load, so that nothing is loaded when an input is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ddr_core import families
from ddr_core.activations import resolve_dtype
from ddr_core.basis import Basis, check_weights_match_capture, load_basis
from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def channel_list(channels: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    return [int(c) for c in torch.as_tensor(channels, dtype=torch.long).flatten().tolist()]


def check_channels(channels: Sequence[int], n_features: int, what: str) -> list[int]:
    """Channels as a list of ints (duplicates dropped, order kept), all in ``[0, n_features)``.

    Raises:
        IndexError: naming the channels out of range and the valid range.
    """
    channels = list(dict.fromkeys(channel_list(channels)))
    bad = [c for c in channels if not 0 <= c < n_features]
    if bad:
        raise IndexError(
            f"channel index(es) {bad} out of range: {what} has {n_features} channels, "
            f"valid indices are 0..{n_features - 1}"
        )
    return channels


def variant_spec(project: Any, variant: str) -> Any:
    """The declared :class:`~ddr_core.config.VariantConfig` of ``variant``.

    Raises:
        KeyError: an unknown variant, naming the declared ones.
    """
    if variant not in project.variants:
        raise KeyError(f"unknown variant {variant!r}; declared: {sorted(project.variants)}")
    return project.variants[variant]


@dataclass(frozen=True)
class VariantChannels:
    """A declared variant and the channels a stage was asked for (checked against its width)."""

    spec: Any
    layer_name: str
    channels: list[int]


def select_variant_channels(project: Any, variant: str, channels: Sequence[int] | None) -> VariantChannels:
    """The variant's spec, layer and requested ``channels`` (``None``: all of its width), before anything loads.

    Raises:
        KeyError: an unknown variant.
        IndexError: a channel outside the variant's declared width.
    """
    spec = variant_spec(project, variant)
    layer_name = project.layer_of(variant)
    what = f"variant {variant!r} ({spec.basis} basis of layer {layer_name!r})"
    selected = list(range(spec.width)) if channels is None else check_channels(channels, spec.width, what)
    return VariantChannels(spec, layer_name, selected)


def load_variant_model(
    project: Any,
    layout: Any,
    variant: str,
    out_dir: Path,
    folder_what: str,
    device: torch.device | str,
    dtype: str,
) -> tuple[Any, Basis]:
    """Check the weights against the capture and the output folder, then load the variant's model and basis.

    Args:
        out_dir: the stage's output folder (checked: not reached through a link), named ``folder_what``
            in the error (e.g. ``"priors folder"``).
        dtype: ``auto`` (float16 on CUDA, float32 elsewhere), ``float32``, ``float16`` or ``bfloat16``.

    Returns:
        The loaded :class:`~ddr_core.families.ModelFamily` and the variant's :class:`~ddr_core.basis.Basis`.

    Raises:
        ddr_core.basis.WeightsChangedError: the model / SAE was provisioned again with other weights since
            the variant's capture.
        ddr_core.paths.UnsafePathError: the output folder is reached through a link.
        ValueError: the declared width disagrees with the model layer / SAE.
    """
    spec = variant_spec(project, variant)
    check_weights_match_capture(project, layout, variant)
    layout.check_output_folder(out_dir, folder_what)  # before the model loads
    device = torch.device(device)
    # looked up on the module at call time, as the stages did (a test may wrap ddr_core.families.load_model)
    model_dir = layout.model_dir(spec.model)
    model = families.load_model(model_dir, device=device, dtype=resolve_dtype(dtype, device, model_dir))
    model.read_layer_as(project.layer_of(variant), project.hook_of(variant))  # the variant's hook (output / residual)
    return model, load_basis(project, layout, variant, model, device)
