"""Where everything lives under the data root.

::

    <data_root>/
      assets/                      provisioned inputs, shared by all experiments
        models/<model>/            diffusers folder (+ .ddr_manifest.json)
        saes/<sae>/                SAeUron folder(s) unet.<layer>/{cfg.json,sae.safetensors}
        prompts/<dataset>/         prompt file
      outputs/<experiment>/        everything an experiment computes
        activations/<capture>/     images, generations table, dense + top-k activations
        timestep_stats/<variant>/  statistics tables and stats.duckdb
        activity_plots/<variant>/  figures
        ...

Provisioned assets are shared across experiments (as in the thesis, whose ``assets_dir`` sat beside
``outputs_dir``); every computed output is namespaced by the experiment name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_EXPERIMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class UnsafePathError(ValueError):
    """A path would leave the directory it must stay in."""


def check_experiment_name(name: str) -> str:
    if not _EXPERIMENT_RE.match(name) or ".." in name:
        raise ValueError(
            f"experiment name {name!r} is not a safe folder name: use letters, digits, '-', '_' or '.'"
        )
    return name


def resolve_inside(root: Path, relative: str | Path) -> Path:
    """``root / relative`` resolved, refusing anything that escapes ``root`` (``..``, absolute, links)."""
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise UnsafePathError(f"path {str(relative)!r} escapes {root}")
    return candidate


@dataclass(frozen=True)
class DataLayout:
    """Paths of one experiment under one data root."""

    data_root: Path
    experiment: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_root", Path(self.data_root).resolve())
        check_experiment_name(self.experiment)

    # provisioned inputs ---------------------------------------------------------------------------
    @property
    def assets_dir(self) -> Path:
        return self.data_root / "assets"

    def model_dir(self, model: str) -> Path:
        return self.assets_dir / "models" / model

    def sae_dir(self, sae: str) -> Path:
        return self.assets_dir / "saes" / sae

    def prompts_dir(self, dataset: str) -> Path:
        return self.assets_dir / "prompts" / dataset

    @property
    def provisioning_records_dir(self) -> Path:
        """Records of provisioned inputs (shared by experiments, like the inputs)."""
        return self.assets_dir / "_records"

    # experiment outputs ---------------------------------------------------------------------------
    @property
    def outputs_dir(self) -> Path:
        return self.data_root / "outputs" / self.experiment

    @property
    def records_dir(self) -> Path:
        """Records (completion reports) of this experiment's computed outputs."""
        return self.outputs_dir / "_records"

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.outputs_dir / stage / key

    def activations_dir(self, capture: str) -> Path:
        return self.stage_dir("activations", capture)

    def timestep_stats_dir(self, variant: str) -> Path:
        return self.stage_dir("timestep_stats", variant)

    def activity_plots_dir(self, variant: str) -> Path:
        return self.stage_dir("activity_plots", variant)

    def relative(self, path: Path) -> str:
        """A path below the data root as a POSIX string relative to it (what tables store)."""
        return Path(path).resolve().relative_to(self.data_root).as_posix()
