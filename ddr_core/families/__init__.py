"""Model families: one :class:`~ddr_core.families.base.ModelFamily` subclass per diffusers pipeline family.

A diffusers folder names its pipeline class in ``model_index.json`` (``_class_name``); :func:`family_of_folder`
maps it to the family, :func:`load_model` loads it. Adding a family is one module defining the subclass plus
its entry in :data:`FAMILY_MODULES`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddr_core.families.base import Conditioning, ModelFamily
from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

FAMILY_MODULES: dict[str, str] = {
    "sd": "ddr_core.families.sd:StableDiffusionFamily",
    "sdxl": "ddr_core.families.sdxl:StableDiffusionXLFamily",
    "flux": "ddr_core.families.flux:FluxFamily",
}
"""Family name -> ``module:class``; imported on first use (a family's diffusers classes load only when used)."""


def family_class(name: str) -> type[ModelFamily]:
    """The family class called ``name`` (``ValueError`` listing the known names)."""
    if name not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILY_MODULES))}")
    module_name, class_name = FAMILY_MODULES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def families() -> list[type[ModelFamily]]:
    return [family_class(name) for name in FAMILY_MODULES]


def family_of_pipeline_class(class_name: str) -> type[ModelFamily]:
    """The family whose ``pipeline_classes`` contains the diffusers class name ``class_name``."""
    for family in families():
        if class_name in family.pipeline_classes:
            return family
    known = sorted(c for family in families() for c in family.pipeline_classes)
    raise ValueError(f"no model family loads the diffusers pipeline {class_name!r}; supported: {', '.join(known)}")


def family_of_folder(model_dir: str | Path) -> type[ModelFamily]:
    """The family of a diffusers folder, from the ``_class_name`` in its ``model_index.json``.

    Raises:
        ddr_core.pipeline.ModelFolderError: no readable ``model_index.json``, or a pipeline no family loads.
    """
    from ddr_core.pipeline import ModelFolderError, check_model_index, reprovision_hint

    index = check_model_index(model_dir)
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelFolderError(f"Model index of {model_dir} names no pipeline class (_class_name). "
                               f"{reprovision_hint()}")
    try:
        return family_of_pipeline_class(class_name)
    except ValueError as error:
        raise ModelFolderError(f"Model folder {model_dir}: {error}") from None


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> ModelFamily:
    """Load a provisioned diffusers folder as its family (checked against its manifest first), in ``dtype``
    (float32 if None; a None default so that importing this module does not import torch)."""
    dtype = torch.float32 if dtype is None else dtype
    from ddr_core.pipeline import check_provisioned_model

    check_provisioned_model(model_dir)
    return family_of_folder(model_dir).load(model_dir, device=device, dtype=dtype)


def as_model(value: Any) -> ModelFamily:
    """A :class:`ModelFamily` from a family (returned as is) or a loaded diffusers pipeline (wrapped)."""
    if isinstance(value, ModelFamily):
        return value
    return family_of_pipeline_class(type(value).__name__)(value)


__all__ = ["Conditioning", "ModelFamily", "FAMILY_MODULES", "as_model", "family_class", "family_of_folder",
           "family_of_pipeline_class", "families", "load_model"]
