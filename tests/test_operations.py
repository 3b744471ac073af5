"""Operations: the instance settings, the schedule, automation of statistics, jobs for the CLI."""

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg

from dagster_project.definitions import defs
from dagster_project.schedules import nightly_capture

ROOT = Path(__file__).resolve().parents[1]


def test_instance_settings_queue_runs_and_limit_the_gpu_pool(tmp_path, monkeypatch):
    shutil.copy(ROOT / "dagster_project" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    instance = dg.DagsterInstance.get()
    config = instance.get_concurrency_config()
    assert config.run_queue_config.max_concurrent_runs == 8
    assert config.pool_config.default_pool_limit == 1
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


def test_instance_settings_detect_dead_run_workers(tmp_path, monkeypatch):
    """A killed run worker must not keep its pool slot: the shipped launcher answers run monitoring's
    health check, monitoring is on, and every job runs under the guarded executor beside the sensor
    that frees dead runs' slots in the daemon (the behaviour: tests/test_dead_worker.py)."""
    from dagster_project.worker_guard import DeadWorkerAwareRunLauncher

    shutil.copy(ROOT / "dagster_project" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    instance = dg.DagsterInstance.get()
    assert isinstance(instance.run_launcher, DeadWorkerAwareRunLauncher)
    assert instance.run_monitoring_enabled and instance.run_launcher.supports_check_run_worker_health
    assert instance.run_monitoring_poll_interval_seconds <= 30
    assert defs.executor is not None and defs.executor.name == "ddr_guarded_executor"
    for job in (defs.resolve_implicit_global_asset_job_def(), defs.resolve_job_def("capture_activations"),
                defs.resolve_job_def("visualise_channel_blocks")):  # `dagster asset materialize` runs the first
        assert job.executor_def.name == "ddr_guarded_executor", job.name
    sensor = defs.resolve_sensor_def("free_dead_worker_pool_slots")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_gpu_assets_share_the_gpu_pool():
    graph = defs.resolve_asset_graph()
    for name in ("activations", "priors", "dreams", "dreams_no_noise", "dream_sweeps"):
        assert graph.get(dg.AssetKey(name)).pools == {"gpu"}, name


def test_nightly_schedule_requests_each_default_capture_group():
    context = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 11, 27, 2, 0))
    requests = list(nightly_capture(context))
    assert [r.partition_key for r in requests] == ["toy-world"]  # default variants: toy-raw, toy-sae
    assert requests[0].run_key == "toy-world-20261127"
    assert defs.get_schedule_def("nightly_capture").default_status == dg.DefaultScheduleStatus.STOPPED


def test_statistics_follow_their_activations():
    node = defs.resolve_asset_graph().get(dg.AssetKey("timestep_stats"))
    assert node.automation_condition is not None


def test_jobs_for_each_stage_family_exist():
    for job in ("provision_models", "capture_activations", "compute_timestep_stats", "visualise_channel_blocks"):
        assert defs.resolve_job_def(job) is not None


def test_partition_keys_are_listed_for_the_command_line(capsys):
    from dagster_project.partitions import asset_partition_keys, main

    keys = asset_partition_keys()
    assert keys["priors"][:2] == ["tiny-raw:0-15", "tiny-raw:16-31"] and "toy-sae:192-255" in keys["priors"]
    assert "toy-world" in keys["activations"] and keys["feature_concepts"] == ["toy-raw", "toy-sae"]
    assert "toy-raw" in keys["timestep_stats"] and "models" in keys
    assert main(["priors", "--variant", "toy-raw", "--range"]) == 0
    assert capsys.readouterr().out.strip() == "toy-raw:0-15...toy-raw:48-63"
    assert main(["timestep_stats", "--variant", "toy-sae"]) == 0
    assert capsys.readouterr().out.strip() == "toy-sae"
    assert main([]) == 0 and "priors: " in capsys.readouterr().out
    assert main(["no_such_asset"]) == 2 and "partitioned assets: " in capsys.readouterr().err
    assert main(["priors", "--variant", "nope"]) == 2 and "variants with keys: " in capsys.readouterr().err
