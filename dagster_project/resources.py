"""Resources: where data lives (storage) and which project configuration is in force."""

from __future__ import annotations

from functools import cached_property

import dagster as dg

from ddr_core.config import ProjectConfig, data_root, load_project_config
from ddr_core.paths import DataLayout


class DdrStorage(dg.ConfigurableResource):
    """The data root and experiment every asset reads and writes.

    Defaults come from the environment: ``DDR_DATA_ROOT`` (else ``<project>/data``) and
    ``DDR_EXPERIMENT`` (else the config file's ``experiment``). Set either in the launchpad or
    ``dagster.yaml`` resource config to override per deployment.
    """

    data_root: str | None = None
    experiment: str | None = None

    @cached_property
    def project(self) -> ProjectConfig:
        return load_project_config()

    @cached_property
    def layout(self) -> DataLayout:
        root = self.data_root or str(data_root())
        return DataLayout(root, self.experiment or self.project.experiment)


class ComputeResource(dg.ConfigurableResource):
    """Where GPU work runs. ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``."""

    device: str = "auto"

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
