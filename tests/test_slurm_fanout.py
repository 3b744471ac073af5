"""Parallel SLURM jobs of one step (ddr_resources.slurm_fanout), without a cluster: all calls are in flight at
once, an interrupted one is resubmitted alone, a failed one fails the step after the others ended, and the
dagster-slurm internals the fan-out adapts still exist in the pinned version.

On the loopback cluster: tests/test_slurm_cluster.py ``test_channel_shards_run_as_parallel_slurm_jobs``."""

from __future__ import annotations

import inspect
import logging
import signal
import threading
from types import SimpleNamespace

import dagster as dg
import pytest

from ddr_core.slurm_options import SlurmJobOptions
from ddr_core.stage_request import StageRequest
from ddr_resources.slurm_fanout import _MainThreadSignals, fanout_settings, run_stages_on_slurm


def _context():
    return SimpleNamespace(log=logging.getLogger("test_slurm_fanout"), run_id="r")


def _requests(n: int) -> list[StageRequest]:
    return [StageRequest(stage="timestep_stats_shard", args={"channels": [i, i + 1]}, data_root="/d",
                         experiment="default", invocation_id=f"inv{i}") for i in range(n)]


def _settings(retries: int = 0):
    return SimpleNamespace(job=SlurmJobOptions(retries=retries))


def test_all_jobs_are_in_flight_at_once_and_reports_come_back_in_order():
    barrier = threading.Barrier(4, timeout=20)  # passes only when all 4 calls wait at the same time

    def run_one(request):
        barrier.wait()  # one call after the other would break the barrier (BrokenBarrierError)
        return {"result": request.args["channels"], "thread": threading.current_thread().name}

    reports = run_stages_on_slurm(_context(), _requests(4), local_data_root="/d", settings=_settings(),
                                  run_one=run_one)
    assert [r["result"] for r in reports] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert len({r["thread"] for r in reports}) == 4


def test_an_interrupted_job_is_resubmitted_alone_the_others_are_not_redone():
    calls: list[tuple[str, list[int]]] = []
    lock = threading.Lock()

    def run_one(request):
        with lock:
            calls.append((request.invocation_id, request.args["channels"]))
            first_try = request.invocation_id == "inv1"
        if first_try:  # what run_stage_on_slurm raises for a preempted / timed-out job
            raise dg.RetryRequested(max_retries=2)
        return {"result": request.args["channels"]}

    reports = run_stages_on_slurm(_context(), _requests(3), local_data_root="/d", settings=_settings(retries=2),
                                  run_one=run_one)
    assert [r["result"] for r in reports] == [[0, 1], [1, 2], [2, 3]]
    by_shard = {}
    for invocation, channels in calls:
        by_shard.setdefault(tuple(channels), []).append(invocation)
    assert by_shard[(0, 1)] == ["inv0"] and by_shard[(2, 3)] == ["inv2"]  # ran once
    assert by_shard[(1, 2)][0] == "inv1" and len(by_shard[(1, 2)]) == 2  # resubmitted once ...
    assert by_shard[(1, 2)][1] != "inv1"  # ... as a new invocation (its own completion report)


def test_resubmissions_are_bounded_by_retries():
    def run_one(request):
        raise dg.RetryRequested(max_retries=1)

    with pytest.raises(dg.Failure, match=r"1 of 1 .*interrupted 2 times; its 1 resubmission"):
        run_stages_on_slurm(_context(), _requests(1), local_data_root="/d", settings=_settings(retries=1),
                            run_one=run_one)


def test_a_failed_job_fails_the_step_after_the_others_finished():
    finished = []
    slow_done = threading.Event()

    def run_one(request):
        if request.invocation_id == "inv0":
            raise dg.Failure(description="SLURM job 17 for timestep_stats_shard failed: boom")
        slow_done.wait(timeout=0.5)
        finished.append(request.invocation_id)
        return {}

    with pytest.raises(dg.Failure, match=r"1 of 3 timestep_stats_shard jobs failed \(the other 2 finished.*job 17"):
        run_stages_on_slurm(_context(), _requests(3), local_data_root="/d", settings=_settings(), run_one=run_one)
    assert sorted(finished) == ["inv1", "inv2"]  # not cancelled: their work is kept for the re-run


def test_every_failed_jobs_error_is_kept_not_only_the_first(caplog):
    """Two jobs fail for their own reasons: the step's failure lists both (metadata ``failed_jobs``) and each is
    logged; before, only the first job's error survived and the second's (its job id, its log tail) was lost."""
    def run_one(request):
        if request.invocation_id in ("inv0", "inv2"):
            job = 17 if request.invocation_id == "inv0" else 18
            raise dg.Failure(description=f"SLURM job {job} for timestep_stats_shard failed: boom {job}")
        return {}

    with caplog.at_level(logging.ERROR, logger="test_slurm_fanout"), pytest.raises(dg.Failure) as failure:
        run_stages_on_slurm(_context(), _requests(3), local_data_root="/d", settings=_settings(), run_one=run_one)
    assert "2 of 3 timestep_stats_shard jobs failed" in failure.value.description
    listed = failure.value.metadata["failed_jobs"].value
    assert [(job["invocation_id"], job["args"]) for job in listed] == [("inv0", {"channels": [0, 1]}),
                                                                       ("inv2", {"channels": [2, 3]})]
    assert "SLURM job 18" in listed[1]["error"]
    assert any("SLURM job 18" in record.getMessage() for record in caplog.records)


def test_the_client_installs_its_signal_handlers_through_the_module_global_the_fan_out_adapts():
    from dagster_slurm.pipes_clients import slurm_pipes_client
    from dagster_slurm.pipes_clients.slurm_pipes_client import SlurmPipesClient

    assert hasattr(slurm_pipes_client, "signal")
    assert "signal.signal(signal.SIGTERM" in inspect.getsource(SlurmPipesClient.run)


def test_each_call_has_its_own_remote_folder_through_public_settings():
    from ddr_resources.slurm import SlurmSettings

    settings = SlurmSettings(host="h", user="u", key_path="/k", env_path="/env")
    assert fanout_settings(settings, "0123abc").remote_base == "$HOME/pipelines/fanout/0123abc"
    custom = SlurmSettings(**{**settings.model_dump(), "remote_base": "/scratch/ddr"})
    assert fanout_settings(custom, "k1").remote_base == "/scratch/ddr/fanout/k1"
    for bad in ("a; rm -rf ~", "../x", ""):
        with pytest.raises(ValueError, match="fan-out key"):
            fanout_settings(settings, bad)


def test_signal_handlers_are_installed_only_from_the_main_thread():
    signals = _MainThreadSignals()
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(signals.signal(signal.SIGTERM, lambda *a: None)))
    thread.start()
    thread.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before  # nothing installed, no error
    assert signals.SIGTERM == signal.SIGTERM and signals.getsignal is signal.getsignal
