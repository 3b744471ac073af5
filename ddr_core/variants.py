"""A variant's basis on a loaded pipeline: its SAE (or none, for raw channels) and its checked width."""

from __future__ import annotations

from typing import Any

import torch


def load_variant_basis(project: Any, layout: Any, variant: str, pipe: Any,
                       device: torch.device | str) -> tuple[Any | None, int]:
    """``(sae or None, width)`` of ``variant`` for the loaded ``pipe``.

    Loads the variant's SAE (SAeUron folder under ``layout.sae_dir``) checked against the layer's
    width, and checks the variant's declared ``width`` (channels for raw, features for an SAE).

    Raises:
        ValueError: the declared width differs from the model / SAE (the message gives the fix).
        ddr_core.sae.SaeFormatError: a missing or broken SAE, or ``d_in`` not matching the layer.
    """
    from ddr_core.pipeline import layer_width
    from ddr_core.sae import find_sae_folder, load_sae

    spec = project.variants[variant]
    layer_name = project.layer_of(variant)
    width = layer_width(pipe.unet, layer_name)
    sae = None
    if spec.basis == "sae":
        folder = find_sae_folder(layout.sae_dir(spec.sae), layer_name)
        sae = load_sae(folder, expected_d_in=width, device=device, dtype=torch.float32)
        width = sae.num_latents
    if width != spec.width:
        raise ValueError(f"variants.{variant}.width is {spec.width} in the config but the {spec.basis} basis "
                         f"has {width}: set `width: {width}`")
    return sae, width
