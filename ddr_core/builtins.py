"""Embedded assets that are built locally instead of downloaded (``source: {builtin: <name>}`` in the config).

Each name maps to a builder ``function(out_dir: Path) -> object`` that writes the asset's folder
deterministically (seeded). A model family brings its tiny model by adding its builders here (the family
module holds the builder; this table only names it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

BUILTINS: dict[str, str] = {
    "tiny": "ddr_core.tiny_model:build_tiny_pipeline",
    "tiny-sae": "ddr_core.tiny_model:build_tiny_sae",
    "tiny-prompts": "ddr_core.tiny_model:build_tiny_prompts",
    "tiny-sdxl": "ddr_core.families.sdxl:build_tiny_sdxl_pipeline",
    "tiny-sdxl-turbo": "ddr_core.families.sdxl:build_tiny_sdxl_turbo_pipeline",
    "tiny-sdxl-sae": "ddr_core.families.sdxl:build_tiny_sdxl_sae",
    "tiny-flux": "ddr_core.families.flux:build_tiny_flux",
    "tiny-flux-sae": "ddr_core.families.flux:build_tiny_flux_sae",
}
"""Builtin name -> ``module:function`` building it into a folder."""


def check_builtin(name: str) -> str:
    """``name`` if it is a known builtin, else ``ValueError`` listing the known ones."""
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin {name!r}; known builtins: {', '.join(sorted(BUILTINS))}")
    return name


def builtin_builder(name: str) -> Callable[[Path], object]:
    """The function that builds builtin ``name`` into a folder."""
    module_name, function_name = BUILTINS[check_builtin(name)].split(":")
    return getattr(importlib.import_module(module_name), function_name)
