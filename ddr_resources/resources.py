"""Resources: where data lives (storage), which project configuration is in force, and where GPU stages run.

Environment variables, the Dagster way: :meth:`DdrStorage.from_env` / :meth:`ComputeResource.from_env`
(the resources of ``dagster_project/definitions.py``) set each field whose variable is set to
``dg.EnvVar(<variable>)``, which Dagster resolves when a run launches (and shows as an environment variable
in the UI, without its value). A field left unset -- no variable when the code location loaded, a variable
set to an empty value, or a run config that gives *other* fields of the resource (Dagster then replaces the
resource's whole configuration) -- falls back to the same variable at use, then to the default. So a run
config value wins over the environment, the environment over the defaults, exactly as before.

| resource field | variable | default |
|---|---|---|
| ``storage.data_root`` | ``DDR_DATA_ROOT`` | ``<project>/data`` |
| ``storage.experiment`` | ``DDR_EXPERIMENT`` | the config file's ``experiment`` |
| ``compute.mode`` | ``DDR_COMPUTE_MODE`` | ``local`` |
| ``compute.processes`` | ``DDR_PROCESSES`` | 1 |

``DDR_CONFIG`` (the project config) is no resource field: the partitions are built from it when the code
location loads, so it is read there (:func:`ddr_core.config.config_path`), not per run. The SLURM settings
(``DDR_SLURM_*``) are validated as a whole by :meth:`ddr_resources.slurm.SlurmSettings.from_env`.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from functools import cached_property
from typing import Any, Self

import dagster as dg
from pydantic import Field, PrivateAttr

from ddr_core.config import ProjectConfig, config_path, data_root, load_project_config
from ddr_core.paths import DataLayout, UnsafePathError

STORAGE_ENV = {"data_root": "DDR_DATA_ROOT", "experiment": "DDR_EXPERIMENT"}
"""DdrStorage field -> the environment variable that configures it."""
COMPUTE_ENV = {"mode": "DDR_COMPUTE_MODE", "processes": "DDR_PROCESSES"}
"""ComputeResource field -> the environment variable that configures it."""
_INT_FIELDS = {"processes"}


def env_value(name: str) -> str | None:
    """The variable ``name`` stripped, or None when it is unset or empty (an empty value means "use the
    default", as in ``.env.example``)."""
    value = os.environ.get(name, "").strip()
    return value or None


def env_fields(variables: dict[str, str], int_fields: Collection[str] = ()) -> dict[str, Any]:
    """``{field: dg.EnvVar(variable)}`` (``dg.EnvVar.int`` for ``int_fields``) for each variable that is set
    and not empty now: Dagster resolves it when a run launches. Unset ones are left out (``dg.EnvVar``
    fails a run when its variable is unset, and these settings are optional)."""
    return {field: (dg.EnvVar.int(name) if field in int_fields else dg.EnvVar(name))
            for field, name in variables.items() if env_value(name) is not None}


def refuse_unresolved(resource: dg.ConfigurableResource, fields: Collection[str]) -> None:
    """Raise when one of ``fields`` still holds a ``dg.EnvVar`` (or ``dg.EnvVar.int``): a resource of
    :meth:`DdrStorage.from_env` / :meth:`ComputeResource.from_env` used outside a run, where Dagster has not
    resolved it. Its stand-in value is the variable's *name* (or 0), which must never become a folder or a
    setting."""
    for field in fields:
        value = getattr(resource, field)
        name = value.env_var_name if isinstance(value, dg.EnvVar) else getattr(value, "name", None)
        if isinstance(value, dg.EnvVar) or (isinstance(value, int) and isinstance(name, str)):
            kind = type(resource).__name__
            raise dg.DagsterInvariantViolationError(
                f"{kind}.{field} is dg.EnvVar({name!r}), which Dagster resolves only when a run launches; "
                f"outside a run use {kind}(), which reads {name} itself")


class DdrStorage(dg.ConfigurableResource):
    """The data root and experiment every asset reads and writes.

    ``data_root``: unset: ``DDR_DATA_ROOT``, else ``<project>/data``. ``experiment``: unset:
    ``DDR_EXPERIMENT``, else the config file's ``experiment``. Set either in the launchpad (run config
    ``resources.storage.config``) to override them for one run; :meth:`from_env` is the deployment's
    instance (module docstring).
    """

    data_root: str | None = Field(default=None, description="data root; unset: DDR_DATA_ROOT, else <project>/data")
    experiment: str | None = Field(default=None, description="experiment (outputs/<experiment>/); unset: "
                                                             "DDR_EXPERIMENT, else the config's experiment")

    @classmethod
    def from_env(cls, **values: Any) -> Self:
        """The storage as the deployment configures it: ``dg.EnvVar`` for each of :data:`STORAGE_ENV` that
        is set; ``values`` win. For Definitions and runs only: Dagster resolves a ``dg.EnvVar`` when a run
        launches, so outside a run use ``DdrStorage()``, which falls back to the same variables itself."""
        return cls(**{**env_fields(STORAGE_ENV), **values})

    @cached_property
    def project(self) -> ProjectConfig:
        return load_project_config()

    @cached_property
    def layout(self) -> DataLayout:
        refuse_unresolved(self, STORAGE_ENV)
        root = self.data_root or str(data_root())  # data_root(): DDR_DATA_ROOT, else <project>/data
        if not self.experiment:  # the config's experiment, DDR_EXPERIMENT applied (and checked) by ddr_core
            return DataLayout(root, self.project.experiment)
        try:
            return DataLayout(root, self.experiment)
        except UnsafePathError as exc:
            raise type(exc)(f"DdrStorage.experiment (from the run config or DDR_EXPERIMENT): {exc}") from None


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
    for as many GPUs (``gpus_per_node``) as processes. :meth:`from_env` is the deployment's instance
    (module docstring).
    """

    device: str = "auto"
    mode: str | None = Field(default=None, description="local | slurm; unset: DDR_COMPUTE_MODE, else local")
    # no ge=1 here: dg.EnvVar.int stands in as 0 until launch; process_count() checks the value
    processes: int | None = Field(default=None,
                                  description="ranks per stage call (one per GPU); unset: DDR_PROCESSES, else 1")
    _run_guard: Any = PrivateAttr(default=None)

    @classmethod
    def from_env(cls, **values: Any) -> Self:
        """The compute resource as the deployment configures it: ``dg.EnvVar`` for each of
        :data:`COMPUTE_ENV` that is set; ``values`` win."""
        return cls(**{**env_fields(COMPUTE_ENV, _INT_FIELDS), **values})

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """A run executed in process (``dg.materialize``, ``make demo``) bypasses the job's guarded
        executor: guard it here, before its steps claim ``gpu`` slots, so that a killed run's slot is
        given back and a dead one's is taken (:mod:`ddr_resources.run_guard`)."""
        from ddr_resources.run_guard import guard_in_process_run

        self._run_guard = guard_in_process_run(context.instance, context.dagster_run)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._run_guard is not None:
            self._run_guard.__exit__(None, None, None)
            self._run_guard = None

    def process_count(self) -> int:
        """Ranks per stage call: ``processes``, else ``DDR_PROCESSES``, else 1.

        Raises:
            dagster.Failure: the value is not a whole number >= 1 (the message names where it came from).
        """
        refuse_unresolved(self, ["processes"])
        if self.processes is not None:
            value: Any = self.processes
            source = "ComputeResource.processes (from the run config or DDR_PROCESSES)"
        else:
            value, source = env_value("DDR_PROCESSES") or "1", "DDR_PROCESSES"
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            raise dg.Failure(description=f"{source} is {value!r}; use a whole number >= 1 (one per GPU)")
        return count

    def compute_mode(self) -> str:
        """``local`` or ``slurm``: ``mode``, else ``DDR_COMPUTE_MODE``, else ``local`` (any case).

        Raises:
            dagster.Failure: another value (the message names where it came from).
        """
        refuse_unresolved(self, ["mode"])
        if self.mode:
            mode, source = self.mode, "ComputeResource.mode"
        else:
            mode, source = env_value("DDR_COMPUTE_MODE") or "local", "DDR_COMPUTE_MODE"
        mode = mode.strip().lower()
        if mode not in COMPUTE_MODES:
            where = " (from the run config or DDR_COMPUTE_MODE)" if self.mode else ""
            raise dg.Failure(description=f"{source} is {mode!r}{where}; use one of {list(COMPUTE_MODES)}")
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
        from ddr_resources.slurm import new_request, run_stage_locally

        layout = storage.layout
        owner = f"dagster run {context.run_id}"
        if self.compute_mode() == "local":
            request = new_request(stage, args, data_root=layout.data_root, experiment=layout.experiment,
                                  device=self.device, lock_owner=owner, processes=self.process_count())
            return run_stage_locally(context, request)

        from ddr_resources.slurm import run_stage_on_slurm

        settings, options = _slurm_settings(options)
        request = self._slurm_request(context, stage, args, layout, settings)
        return run_stage_on_slurm(context, request, local_data_root=layout.data_root, settings=settings,
                                  options=options)

    def _slurm_request(self, context: dg.AssetExecutionContext, stage: str, args: dict[str, Any], layout: Any,
                       settings: Any) -> Any:
        """The :class:`~ddr_core.stage_request.StageRequest` of one SLURM call: the cluster's data root and
        config (``DDR_SLURM_DATA_ROOT`` / ``DDR_SLURM_CONFIG``, else this machine's), this run as lock owner."""
        from ddr_resources.slurm import new_request

        return new_request(stage, args, data_root=settings.data_root or layout.data_root,
                           experiment=layout.experiment,
                           config_path=settings.config_path or str(config_path().resolve()),
                           device=self.device, lock_owner=f"dagster run {context.run_id}",
                           processes=self.process_count())

    def run_stages(self, context: dg.AssetExecutionContext, stage: str, calls: list[dict[str, Any]], *,
                   storage: DdrStorage, options: dict | Any | None = None) -> list[dict[str, Any]]:
        """Run the stage ``stage`` once per JSON ``args`` of ``calls``; their completion reports, in order.

        Compute mode ``slurm``: every call is its own SLURM job, all submitted at once and waited for together
        (:func:`ddr_resources.slurm_fanout.run_stages_on_slurm`; an interrupted job is resubmitted alone).
        Compute mode ``local``: one call after the other in this process (the same code path as
        :meth:`run_stage`; a local machine has no queue to fan out to).

        Raises:
            dagster.Failure: a call failed (on SLURM: after every job has ended, naming how many failed).
        """
        if self.compute_mode() == "local" or len(calls) <= 1:
            return [self.run_stage(context, stage, args, storage=storage, options=options) for args in calls]

        from ddr_resources.slurm_fanout import run_stages_on_slurm

        layout = storage.layout
        settings, options = _slurm_settings(options)
        requests = [self._slurm_request(context, stage, args, layout, settings) for args in calls]
        return run_stages_on_slurm(context, requests, local_data_root=layout.data_root, settings=settings,
                                   options=options)


def _slurm_settings(options: dict | Any | None) -> tuple[Any, dict | None]:
    """The deployment's SLURM settings (``DDR_SLURM_*``) and a call's job ``options`` as a dict (a Dagster config
    or pydantic model dumped without its unset fields).

    Raises:
        dagster.Failure: the settings are invalid (the message names the variable).
    """
    from ddr_resources.slurm import SlurmSettings

    try:
        settings = SlurmSettings.from_env()
    except ValueError as exc:
        raise dg.Failure(description=f"compute mode slurm: {exc}") from None
    if options is not None and hasattr(options, "model_dump") and not isinstance(options, dict):
        options = options.model_dump(exclude_none=True)
    return settings, options


def compute_metadata(*reports: dict[str, Any]) -> dict[str, Any]:
    """Where the stage calls of one materialization ran: hosts, and the SLURM job ids when on SLURM."""
    metadata: dict[str, Any] = {
        "compute_hosts": dg.MetadataValue.json(sorted({str(r.get("host")) for r in reports})),
    }
    jobs = [str(r["slurm_job_id"]) for r in reports if r.get("slurm_job_id")]
    if jobs:
        metadata["slurm_job_ids"] = dg.MetadataValue.json(jobs)
    return metadata
