"""Resources: where data lives (storage), which project configuration is in force, and where GPU stages run."""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from ddr_core.config import ProjectConfig, config_path, data_root, load_project_config
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


COMPUTE_MODES = ("local", "slurm")


class ComputeResource(dg.ConfigurableResource):
    """Where GPU work runs: every GPU asset calls :meth:`run_stage`, the one code path
    (:func:`ddr_core.cluster_payload.run_stage`) in-process or as a SLURM job.

    ``mode``: ``local`` (in-process, the default) or ``slurm`` (one ``sbatch`` job per call through
    dagster-slurm, configured by ``DDR_SLURM_*``; see docs/CLUSTER.md); unset: ``DDR_COMPUTE_MODE``,
    else ``local``. ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``
    -- as the machine running the stage sees it. ``processes``: ranks per stage call (one per GPU of
    the node; ``torchrun`` splits capture batches and dream/prior channels across them, see
    docs/ARCHITECTURE.md "Multi-GPU inside a job"); unset: ``DDR_PROCESSES``, else 1. On SLURM, ask
    for as many GPUs (``gpus_per_node``) as processes.
    """

    device: str = "auto"
    mode: str | None = Field(default=None, description="local | slurm; unset: DDR_COMPUTE_MODE, else local")
    processes: int | None = Field(default=None, ge=1,
                                  description="ranks per stage call (one per GPU); unset: DDR_PROCESSES, else 1")
    _run_guard: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """A run executed in process (``dg.materialize``, ``make demo``) bypasses the job's guarded
        executor: guard it here, before its steps claim ``gpu`` slots, so that a killed run's slot is
        given back and a dead one's is taken (dagster_project/worker_guard.py)."""
        from dagster_project.worker_guard import guard_in_process_run

        self._run_guard = guard_in_process_run(context.instance, context.dagster_run)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._run_guard is not None:
            self._run_guard.__exit__(None, None, None)
            self._run_guard = None

    def process_count(self) -> int:
        value = self.processes if self.processes is not None else os.environ.get("DDR_PROCESSES", "1").strip()
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            source = "ComputeResource.processes" if self.processes is not None else "DDR_PROCESSES"
            raise dg.Failure(description=f"{source} is {value!r}; use a whole number >= 1 (one per GPU)")
        return count

    def compute_mode(self) -> str:
        mode = (self.mode or os.environ.get("DDR_COMPUTE_MODE") or "local").strip().lower()
        if mode not in COMPUTE_MODES:
            source = "ComputeResource.mode" if self.mode else "DDR_COMPUTE_MODE"
            raise dg.Failure(description=f"{source} is {mode!r}; use one of {list(COMPUTE_MODES)}")
        return mode

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def run_stage(self, context: dg.AssetExecutionContext, stage: str, args: dict[str, Any], *,
                  storage: DdrStorage, options: dict | Any | None = None) -> dict[str, Any]:
        """Run the ``ddr_core.cluster_payload`` stage ``stage`` with JSON ``args`` on ``storage``'s data
        root and experiment; return its completion report (``report["result"]`` is the stage's result;
        paths in it are relative to the data root).

        ``options``: SLURM job options of this call (a ``SlurmJobOptions``, a dict or a Dagster config with
        the same fields), merged over the deployment defaults (``DDR_SLURM_*``); ignored locally.

        Raises:
            dagster.Failure: the stage raised (with its traceback tail), or the SLURM job failed or ended
                without its completion report (with the job id and the tail of its log).
        """
        from dagster_project.slurm import new_request, run_stage_locally

        layout = storage.layout
        owner = f"dagster run {context.run_id}"
        if self.compute_mode() == "local":
            request = new_request(stage, args, data_root=layout.data_root, experiment=layout.experiment,
                                  device=self.device, lock_owner=owner, processes=self.process_count())
            return run_stage_locally(context, request)

        from dagster_project.slurm import SlurmSettings, run_stage_on_slurm

        try:
            settings = SlurmSettings.from_env()
        except ValueError as exc:
            raise dg.Failure(description=f"compute mode slurm: {exc}") from None
        if options is not None and hasattr(options, "model_dump") and not isinstance(options, dict):
            options = options.model_dump(exclude_none=True)
        request = new_request(stage, args, data_root=settings.data_root or layout.data_root,
                              experiment=layout.experiment,
                              config_path=settings.config_path or str(config_path().resolve()),
                              device=self.device, lock_owner=owner, processes=self.process_count())
        return run_stage_on_slurm(context, request, local_data_root=layout.data_root, settings=settings,
                                  options=options)


def compute_metadata(*reports: dict[str, Any]) -> dict[str, Any]:
    """Where the stage calls of one materialization ran: hosts, and the SLURM job ids when on SLURM."""
    metadata: dict[str, Any] = {
        "compute_hosts": dg.MetadataValue.json(sorted({str(r.get("host")) for r in reports})),
    }
    jobs = [str(r["slurm_job_id"]) for r in reports if r.get("slurm_job_id")]
    if jobs:
        metadata["slurm_job_ids"] = dg.MetadataValue.json(jobs)
    return metadata
