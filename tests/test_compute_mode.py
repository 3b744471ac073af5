"""``ComputeResource``: the one code path of the GPU stages, its modes, and the guards that need no cluster.

The SLURM runs themselves are in ``tests/test_slurm_cluster.py`` (real jobs on a local cluster).
"""

import os
import subprocess
import sys

import dagster as dg
import pytest

from ddr_assets.configs import SlurmRunConfig
from ddr_resources.resources import ComputeResource, DdrStorage
from ddr_resources.slurm import SlurmJobOptions, SlurmSettings, new_request, run_stage_on_slurm
from tests.tiny_graph import asset_def

CLUSTER_ENV = {"DDR_SLURM_HOST": "login.example.org", "DDR_SLURM_USER": "plgsomeone",
               "DDR_SLURM_KEY_PATH": "/home/someone/.ssh/id_ed25519", "DDR_SLURM_ENV_PATH": "/net/envs/ddr"}


def _failure(result: dg.ExecuteInProcessResult) -> tuple[str, dict]:
    data = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data
    user = data.user_failure_data
    return str(data.error), ({k: v.value for k, v in user.metadata.items()} if user else {})


def _selftest_asset(args: dict, reports: list):
    @dg.asset
    def selftest(context: dg.AssetExecutionContext, storage: DdrStorage, compute: ComputeResource):
        reports.append(compute.run_stage(context, "selftest", args, storage=storage))

    return selftest


def test_mode_comes_from_the_resource_then_the_environment(monkeypatch):
    monkeypatch.delenv("DDR_COMPUTE_MODE", raising=False)
    assert ComputeResource().compute_mode() == "local"
    monkeypatch.setenv("DDR_COMPUTE_MODE", "SLURM")
    assert ComputeResource().compute_mode() == "slurm"
    assert ComputeResource(mode="local").compute_mode() == "local"
    monkeypatch.setenv("DDR_COMPUTE_MODE", "gpu")
    with pytest.raises(dg.Failure, match=r"DDR_COMPUTE_MODE is 'gpu'; use one of \['local', 'slurm'\]"):
        ComputeResource().compute_mode()
    with pytest.raises(dg.Failure, match="ComputeResource.mode is 'cluster'"):
        ComputeResource(mode="cluster").compute_mode()


def test_local_mode_runs_in_process_and_leaves_no_job_files(tmp_path):
    reports = []
    result = dg.materialize([_selftest_asset({"echo": "hi"}, reports)], resources={
        "storage": DdrStorage(data_root=str(tmp_path)), "compute": ComputeResource(device="cpu", mode="local")})
    assert result.success and reports[0]["result"]["echo"] == "hi" and reports[0]["stage"] == "selftest"
    # the report is the return value in-process: no report files (an empty _jobs/ folder may stay)
    assert not [p for p in tmp_path.rglob("*") if not p.is_dir()]


def test_local_mode_failure_carries_the_traceback_and_writes_nothing(tmp_path):
    result = dg.materialize([_selftest_asset({"fail": True, "message": "boom"}, [])], raise_on_error=False,
                            resources={"storage": DdrStorage(data_root=str(tmp_path)),
                                       "compute": ComputeResource(device="cpu", mode="local")})
    assert not result.success
    message, metadata = _failure(result)
    assert "stage 'selftest'" in message and "RuntimeError: boom" in message
    assert "RuntimeError: boom" in metadata["traceback_tail"]
    assert not [p for p in tmp_path.rglob("*") if not p.is_dir()]


def test_slurm_mode_without_cluster_settings_names_the_variables(tmp_path, monkeypatch):
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    result = dg.materialize([_selftest_asset({}, [])], raise_on_error=False, resources={
        "storage": DdrStorage(data_root=str(tmp_path)), "compute": ComputeResource(device="cpu", mode="slurm")})
    message, _ = _failure(result)
    assert "compute mode slurm" in message
    assert all(name in message for name in CLUSTER_ENV) and "docs/CLUSTER.md" in message


class _VanishedJob:
    """What dagster-slurm 1.22 does on a cluster without accounting: once the job has left the queue it
    cannot read its final state and *assumes completion* -- ``run`` returns as if the job succeeded."""

    def __init__(self):
        self.calls = []

    def run(self, **kwargs):
        self.calls.append(kwargs)


def test_a_job_that_ends_without_its_completion_report_fails_the_run(tmp_path):
    """Issue 7, "cluster without accounting": no report of this invocation -> no materialization."""
    vanished = _VanishedJob()
    settings = SlurmSettings.from_env(CLUSTER_ENV)

    @dg.asset
    def ghost(context: dg.AssetExecutionContext):
        request = new_request("selftest", {}, data_root=tmp_path, experiment="default")
        run_stage_on_slurm(context, request, local_data_root=tmp_path, settings=settings, compute=vanished)

    result = dg.materialize([ghost], raise_on_error=False)
    assert not result.success and not result.get_asset_materialization_events()
    message, metadata = _failure(result)
    assert "ended without its completion report" in message and "accounting" in message
    assert "DDR_SLURM_DATA_ROOT" in message  # the other cause: a data root the cluster does not share
    assert metadata["invocation_id"] in message
    (call,) = vanished.calls  # the job was "submitted" with the deployment's options
    assert call["extra_slurm_opts"] == {"gpus_per_node": 0, "cpus_per_task": 4, "mem": "16G",
                                        "time_limit": "02:00:00"}
    assert call["extras"]["request"]["stage"] == "selftest"


def test_run_config_options_merge_over_the_deployment_defaults():
    settings = SlurmSettings.from_env({**CLUSTER_ENV, "DDR_SLURM_PARTITION": "plgrid-gpu-a100",
                                       "DDR_SLURM_ACCOUNT": "plgddr-gpu-a100", "DDR_SLURM_GPUS_PER_NODE": "1",
                                       "DDR_SLURM_MEM": "40G", "DDR_SLURM_REQUEUE": "yes"})
    run = SlurmRunConfig(time_limit="08:00:00", gpus_per_node=2, requeue=False, mail_type="END,FAIL",
                         mail_user="someone@example.org")
    job = settings.job.merged(run.model_dump())
    assert job.extra_slurm_opts() == {"partition": "plgrid-gpu-a100", "account": "plgddr-gpu-a100",
                                      "gpus_per_node": 2, "cpus_per_task": 4, "mem": "40G",
                                      "time_limit": "08:00:00"}
    assert job.sbatch_directives() == ["#SBATCH --no-requeue", "#SBATCH --mail-type=END,FAIL",
                                       "#SBATCH --mail-user=someone@example.org"]
    assert settings.job.merged(SlurmRunConfig().model_dump()) == settings.job  # unset fields keep defaults
    per_call = job.merged(SlurmJobOptions(mem="80G"))  # a call's options over the asset's
    assert per_call.mem == "80G" and per_call.time_limit == "08:00:00"
    assert "mem" in SlurmSettings.from_env(CLUSTER_ENV).job.extra_slurm_opts()  # mem always passed


@pytest.mark.parametrize("name", ["activations", "priors", "dreams", "dreams_no_noise"])
def test_every_gpu_asset_takes_a_slurm_section_in_its_run_config(name):
    job = dg.Definitions(assets=[asset_def(name)], resources={"storage": DdrStorage(), "compute": ComputeResource()}
                         ).resolve_implicit_global_asset_job_def()
    section = {"partition": "p", "account": "a", "qos": "normal", "gpus_per_node": 1, "cpus_per_task": 8,
               "mem": "40G", "time_limit": "1-00:00:00", "requeue": True, "mail_type": "FAIL",
               "mail_user": "x@example.org"}
    assert dg.validate_run_config(job, {"ops": {name: {"config": {"slurm": section}}}})
    with pytest.raises(dg.DagsterInvalidConfigError, match="gpu_per_node"):
        dg.validate_run_config(job, {"ops": {name: {"config": {"slurm": {"gpu_per_node": 1}}}}})


def test_local_mode_never_imports_dagster_slurm(tmp_path):
    """Local mode is the fast path: the whole code location and an in-process stage run without it."""
    script = f"""
import sys
import dagster as dg
from dagster_project.definitions import defs
from ddr_resources.resources import ComputeResource, DdrStorage

@dg.asset
def selftest(context: dg.AssetExecutionContext, storage: DdrStorage, compute: ComputeResource):
    compute.run_stage(context, "selftest", {{}}, storage=storage)

assert dg.materialize([selftest], resources={{"storage": DdrStorage(data_root={str(tmp_path)!r}),
                                              "compute": ComputeResource(mode="local")}}).success
print("dagster_slurm" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DDR_COMPUTE_MODE": "local"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow
def test_processes_run_the_stage_as_torchrun_ranks(tmp_path, monkeypatch):
    """``processes`` (or DDR_PROCESSES) > 1: the same stage call runs as that many ranks (gloo on CPU)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reports = []
    result = dg.materialize([_selftest_asset({"echo": "ranks"}, reports)], resources={
        "storage": DdrStorage(data_root=str(tmp_path)),
        "compute": ComputeResource(device="cpu", mode="local", processes=2)})
    assert result.success, _failure(result)
    assert reports[0]["world_size"] == 2 and len(reports[0]["ranks"]) == 2
    monkeypatch.setenv("DDR_PROCESSES", "zero")
    with pytest.raises(dg.Failure, match="DDR_PROCESSES is 'zero'"):
        ComputeResource().process_count()
