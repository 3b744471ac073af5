"""A variant's basis on a loaded pipeline: its SAE (or none, for raw channels) and its checked width."""

from __future__ import annotations

import json
from typing import Any

import torch


class WeightsChangedError(ValueError):
    """A variant's model or SAE folder holds other weights than its capture (and so its statistics) was made with."""


def check_weights_match_capture(project: Any, layout: Any, variant: str) -> None:
    """Refuse to steer ``variant`` with other weights than its capture recorded.

    Priors, dreams and sweeps pick channels and timesteps from statistics of the ``activations`` capture;
    the capture's record names the content hash of the model and SAE it loaded (``upstream``). When the
    folder now provisioned has another content hash, the statistics describe weights that are gone.
    Nothing is compared when there is no capture record or a folder has no manifest.

    Raises:
        WeightsChangedError: naming the model / SAE, both hashes and the fix.
    """
    from ddr_core.provisioning import provisioned_content_hash
    from ddr_core.records import record_path

    spec = project.variants[variant]
    group = project.capture_of(variant)
    path = record_path(layout.records_dir, "activations", group)
    try:
        upstream = json.loads(path.read_text(encoding="utf-8")).get("upstream")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(upstream, dict):
        return
    folders = {("model", spec.model): layout.model_dir(spec.model)}
    if spec.sae:
        folders[("SAE", spec.sae)] = layout.sae_dir(spec.sae)
    for (kind, name), folder in folders.items():
        captured = upstream.get(f"{'models' if kind == 'model' else 'saes'}/{name}")
        now = provisioned_content_hash(folder)
        if isinstance(captured, str) and now is not None and captured != now:
            raise WeightsChangedError(
                f"{kind} {name!r} now holds other weights (content hash {now[:12]}) than activations[{group}] "
                f"was captured with ({captured[:12]}): the statistics and channels of variant {variant!r} "
                f"describe the old weights. Materialize activations[{group}] again and what depends on it "
                f"(timestep_stats, priors, dreams), or provision the weights it was captured with again"
            )


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
