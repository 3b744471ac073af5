"""The GPU assets on a real SLURM cluster (scripts/slurm/start_local_cluster.sh), against local mode.

Skipped unless ``DDR_SLURM_HOST`` is set (``eval "$(scripts/slurm/start_local_cluster.sh 2>/dev/null)"``);
needs DDR_SLURM_HOST/PORT/USER/KEY_PATH/ENV_PATH (docs/CLUSTER.md) and a data root the cluster shares
(the loopback cluster shares everything). Each test submits real ``sbatch`` jobs through dagster-slurm:

- ``activations`` and ``dreams`` partitions materialized with ``ComputeResource(mode="slurm")`` equal the
  same partitions materialized in-process (activations bitwise, dreams to float tolerance);
- the per-asset run config's ``slurm`` section reaches ``sbatch`` (checked in ``sacct``);
- a payload that raises fails the run naming the job id and the traceback tail;
- jobs that die without the payload's error report (over their ``--mem``, node failure, time limit,
  ``scancel``) fail the run with the job id, the Slurm state and the tail of the job's own log;
- after ``scancel`` of a dreams job mid-partition, a re-run finishes without redoing finished channels.
"""

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from safetensors.numpy import load_file

from ddr_resources.resources import ComputeResource, DdrStorage
from tests.tiny_graph import asset_def, metadata, step_error


def _skip_reason() -> str | None:
    if not os.environ.get("DDR_SLURM_HOST"):
        return ("SLURM TESTS SKIPPED: no cluster (DDR_SLURM_HOST unset). Run "
                "`eval \"$(sudo scripts/slurm/start_local_cluster.sh 2>/dev/null)\"` first (docs/CLUSTER.md)")
    if not os.environ.get("DDR_SLURM_ENV_PATH"):
        return ("SLURM TESTS SKIPPED: DDR_SLURM_ENV_PATH unset: the cluster has no pre-deployed env with ddr "
                "(start_local_cluster.sh warns why; run `make setup` before it)")
    return None


SKIP = _skip_reason()
if SKIP is not None and os.environ.get("DDR_REQUIRE_SLURM"):  # .ci/run as root: a cluster was promised
    raise RuntimeError(f"DDR_REQUIRE_SLURM is set but the SLURM tests cannot run: {SKIP}")
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

CAPTURE = {"n_prompts": 6, "batch_size": 4, "num_inference_steps": 8, "seed": 1}
STATS = {"top_k": 5, "peak_separation": 50}
DREAM_CHANNELS = [0, 1, 2, 3]
# 2 elements (seeds) per channel and per batch: channels finish one at a time, about a second apart on
# one CPU thread (room to cancel the job between them)
DREAMS = {"channels": DREAM_CHANNELS, "use_prior": False, "n_results": 2, "seeds": [3, 4], "num_steps": 16,
          "timesteps": ["0"], "batch_size": 2, "snapshot_every": 0}


def materialize(name: str, key: str, root: Path, instance: dg.DagsterInstance, mode: str = "local",
                config: dict | None = None, experiment: str = "local") -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [asset_def(name)], partition_key=key, instance=instance,
        resources={"storage": DdrStorage(data_root=str(root), experiment=experiment),
                   "compute": ComputeResource(device="cpu", mode=mode)},
        run_config={"ops": {name: {"config": config}}} if config else None, raise_on_error=False,
    )


def failure(result: dg.ExecuteInProcessResult) -> tuple[str, dict]:
    """(message, metadata) of the run's step failure."""
    data = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data
    user = data.user_failure_data
    return str(data.error), ({k: v.value for k, v in user.metadata.items()} if user else {})


def on_cluster(command: str) -> str:
    """Run a shell command on the cluster's login node over the same SSH settings the jobs use (one
    multiplexed connection, so that a command takes milliseconds, not a handshake)."""
    env = os.environ
    options = ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ControlMaster=auto",
               "-o", "ControlPath=/tmp/ddr-test-ssh-%C", "-o", "ControlPersist=30"]
    if env.get("DDR_SLURM_HOST_KEY_CHECKING") == "off":
        options += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    done = subprocess.run(["ssh", *options, "-p", env.get("DDR_SLURM_PORT", "22"), "-i", env["DDR_SLURM_KEY_PATH"],
                           f"{env['DDR_SLURM_USER']}@{env['DDR_SLURM_HOST']}", command],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def cancel_jobs(name_prefix: str) -> list[str]:
    """``scancel`` the jobs whose name starts with ``name_prefix``, in one round trip; their ids."""
    ids = on_cluster(f"ids=$(squeue -h -o '%A %j' | awk '$2 ~ /^{name_prefix}/ {{print $1}}'); "
                     f"[ -n \"$ids\" ] && scancel $ids; echo $ids")
    return ids.split()


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """In-process runs use one CPU thread, like the jobs (``-c 1``, ``OMP_NUM_THREADS`` from it): equal
    thread counts keep float reductions identical, and a shared machine never oversubscribes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """One data root with the tiny inputs and two experiments, ``slurm`` and ``local``: each with
    ``activations[tiny]`` (on SLURM in one, in-process in the other) and ``timestep_stats[tiny-raw]``."""
    instance = dg.DagsterInstance.ephemeral()
    root = tmp_path_factory.mktemp("slurm_vs_local")
    for name, key in [("models", "tiny"), ("saes", "tiny-sae"), ("prompt_datasets", "tiny-prompts")]:
        provisioned = materialize(name, key, root, instance)  # inputs are shared by the experiments
        assert provisioned.success, step_error(provisioned)
    activations = {}
    for where in ("slurm", "local"):
        config = {**CAPTURE, **({"slurm": {"mem": "1500M", "time_limit": "00:15:00"}} if where == "slurm" else {})}
        result = materialize("activations", "tiny", root, instance, where, config, experiment=where)
        assert result.success, step_error(result)
        activations[where] = metadata(result, "activations")
        stats = materialize("timestep_stats", "tiny-raw", root, instance, config=STATS, experiment=where)
        assert stats.success, step_error(stats)
    return root, activations, instance


def test_activations_on_slurm_equal_local_and_the_run_config_reaches_sbatch(chains):
    root, activations, _ = chains
    slurm_dir, local_dir = (root / f"outputs/{w}/activations/tiny" for w in ("slurm", "local"))
    files = sorted(p.relative_to(slurm_dir) for p in slurm_dir.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(local_dir) for p in local_dir.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(slurm_dir / name), load_file(local_dir / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    generations = [pl.read_parquet(d / "generations.parquet").drop("image_path") for d in (slurm_dir, local_dir)]
    assert generations[0].equals(generations[1])  # (image paths differ by the experiment's folder)
    images = sorted(p.name for p in (slurm_dir / "images").glob("*.png"))
    assert len(images) == CAPTURE["n_prompts"]
    assert all((slurm_dir / "images" / n).read_bytes() == (local_dir / "images" / n).read_bytes() for n in images)
    on_slurm, local = activations["slurm"], activations["local"]
    for key in ("generations", "prompts", "timesteps", "channels_per_variant", "base_seed", "upstream_versions"):
        assert on_slurm[key] == local[key], key
    assert "slurm_job_ids" not in local
    (job_id,) = on_slurm["slurm_job_ids"]
    # the asset's run config `slurm: {mem: 1500M, time_limit: 00:15:00}` over the deployment defaults
    accounted = on_cluster(f"sacct -X -n -P -j {job_id} -o State,ReqMem,Timelimit")
    assert accounted.split("|") == ["COMPLETED", "1500M", "00:15:00"], accounted


def test_crashing_payload_fails_the_run_naming_job_and_traceback(tmp_path):
    @dg.asset
    def crashing(context: dg.AssetExecutionContext, storage: DdrStorage, compute: ComputeResource):
        compute.run_stage(context, "selftest", {"fail": True, "message": "boom from payload"}, storage=storage)

    result = dg.materialize([crashing], raise_on_error=False, resources={
        "storage": DdrStorage(data_root=str(tmp_path)), "compute": ComputeResource(device="cpu", mode="slurm")})
    assert not result.success
    message, meta = failure(result)
    assert meta["slurm_job_id"].isdigit() and f"SLURM job {meta['slurm_job_id']} " in message
    assert "boom from payload" in message
    assert "RuntimeError: boom from payload" in meta["traceback_tail"]
    written = [p.name for p in (tmp_path / "outputs/default/_jobs").glob("*.json")]
    assert written and all(name.endswith(".error.json") for name in written)  # no completion report


def test_job_over_its_memory_is_killed_and_the_run_names_job_and_log(chains):
    root, _, instance = chains
    result = materialize("activations", "tiny", root, instance, "slurm", {**CAPTURE, "slurm": {"mem": "200M"}},
                         experiment="slurm")
    assert not result.success
    message, meta = failure(result)
    job_id = meta["slurm_job_id"]
    assert job_id.isdigit() and f"SLURM job {job_id} " in message
    assert "without the payload's error report" in message
    # the local cluster enforces --mem by sampling (OverMemoryKill); a cgroup cluster's log says "oom-kill"
    assert any(word in meta["job_log_tail"].lower() for word in ("exceeded memory limit", "oom")), meta["job_log_tail"]
    assert meta["job_log_tail"].splitlines()[-1] in message  # the log tail is in the message, too


def _when_running(stage_name: str, action, stop: threading.Event, timeout: float = 300):
    """A thread that waits until a job whose name contains ``stage_name`` runs, then calls
    ``action(job_id)``; ``.jobs`` lists the ids it acted on."""
    jobs: list[str] = []

    def watch():
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            running = [line.split() for line in on_cluster("squeue -h -t R -o '%A %j'").splitlines()]
            mine = [job for job, name in running if stage_name in name]
            if mine:
                jobs.extend(mine)
                for job in mine:
                    action(job)
                return
            time.sleep(0.3)

    thread = threading.Thread(target=watch, daemon=True)
    thread.jobs = jobs
    thread.start()
    return thread


def _node_failure(job_id: str) -> None:
    node = on_cluster(f"squeue -h -j {job_id} -o %N")
    on_cluster(f"scontrol update nodename={node} state=down reason=ddr-test-node-failure")
    # back to service for the next tests; "Invalid node state transition" when slurmctld already resumed it
    on_cluster(f"sleep 2; scontrol update nodename={node} state=resume || sinfo -h -n {node} -o %T | grep -qv down")


LOCAL_ADMIN = os.environ.get("DDR_SLURM_USER") == "root"


@pytest.mark.skipif(SKIP is None and not LOCAL_ADMIN,
                    reason="needs Slurm admin rights (DDR_SLURM_USER=root: the local test cluster)")
@pytest.mark.parametrize(("fault", "action", "state", "log_line"), [
    ("node failure", _node_failure, "NODE_FAIL", "DUE TO NODE FAILURE"),
    # Slurm enforces time limits on a ~30 s cycle; a limit below the elapsed time is what expiry looks like
    pytest.param("time limit", lambda job: on_cluster(f"scontrol update jobid={job} timelimit=0"), "TIMEOUT",
                 "DUE TO TIME LIMIT", marks=pytest.mark.slow),
])
def test_a_job_slurm_kills_fails_the_run_with_job_id_and_log_tail(chains, fault, action, state, log_line):
    """A long ``dreams_no_noise`` job (1000 steps) killed by Slurm itself: no payload error report, the
    job's own log. ``requeue: false`` (an ``#SBATCH`` line): on node failure Slurm would requeue it;
    ``retries: 0``: otherwise the wrapper would resubmit it (the preemption tests below)."""
    root, _, instance = chains
    config = {**DREAMS, "channels": [14, 15], "num_steps": 1000, "slurm": {"requeue": False, "retries": 0}}
    stop = threading.Event()
    watcher = _when_running("dagster_dreams_no_noise", action, stop)
    try:
        result = materialize("dreams_no_noise", "tiny-raw:0-15", root, instance, "slurm", config,
                             experiment="slurm")
    finally:
        stop.set()
        watcher.join(60)
    (job_id,) = watcher.jobs
    assert not result.success
    message, meta = failure(result)
    assert meta["slurm_job_id"] == job_id and f"SLURM job {job_id} " in message
    assert state in message and "without the payload's error report" in message
    assert f"JOB {job_id} ON" in meta["job_log_tail"] and log_line in meta["job_log_tail"], meta["job_log_tail"]
    assert on_cluster(f"sacct -X -n -P -j {job_id} -o State").split("\n")[0].startswith(state)


def _finished(out_dir: Path) -> dict[int, int]:
    """channel -> mtime (ns) of its latents, for every finished dream channel."""
    from ddr_core.dreams import finished_channels

    return {c: max(p.stat().st_mtime_ns for p in (out_dir / f"channel_{c:05d}").rglob("latents.safetensors"))
            for c in finished_channels(out_dir)}


def test_scancel_of_a_dreams_job_midway_then_rerun_resumes_and_equals_local(chains):
    root, _, instance = chains
    local = materialize("dreams", "tiny-raw:0-15", root, instance, config=DREAMS)
    assert local.success, step_error(local)

    out_dir = root / "outputs/slurm/dreams/tiny-raw"
    cancelled_jobs: list[str] = []
    stop = threading.Event()

    def cancel_after_the_first_channel():  # in a thread: dagster-slurm needs the main one (signal handlers)
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            if out_dir.is_dir() and _finished(out_dir):
                cancelled_jobs.extend(cancel_jobs("dagster_dreams__"))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=cancel_after_the_first_channel, daemon=True)
    watcher.start()
    try:
        cancelled = materialize("dreams", "tiny-raw:0-15", root, instance, "slurm", DREAMS, experiment="slurm")
    finally:
        stop.set()
        watcher.join(60)
    (job_id,) = cancelled_jobs
    assert not cancelled.success
    message, meta = failure(cancelled)
    assert meta["slurm_job_id"] == job_id and f"SLURM job {job_id} " in message
    assert "cancelled" in message.lower() and "without the payload's error report" in message
    assert f"JOB {job_id} ON" in meta["job_log_tail"] and "CANCELLED" in meta["job_log_tail"]

    before = _finished(out_dir)
    assert 1 <= len(before) < len(DREAM_CHANNELS), before  # killed mid-partition
    rerun = materialize("dreams", "tiny-raw:0-15", root, instance, "slurm", DREAMS, experiment="slurm")
    assert rerun.success, step_error(rerun)
    meta = metadata(rerun, "dreams")
    assert meta["channels_resumed"] == len(before)
    assert meta["channels_done"] == len(DREAM_CHANNELS) - len(before)
    after = _finished(out_dir)
    assert set(after) == set(DREAM_CHANNELS)
    assert {c: after[c] for c in before} == before  # finished channels were not redone

    local_dir = root / "outputs/local/dreams/tiny-raw"
    names = sorted(p.relative_to(local_dir) for p in local_dir.rglob("latents.safetensors"))
    assert names and names == sorted(p.relative_to(out_dir) for p in out_dir.rglob("latents.safetensors"))
    for name in names:
        a, b = load_file(out_dir / name), load_file(local_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=f"{name}:{key}")
    quality = pl.read_parquet(out_dir / "quality.parquet")
    assert quality.height == quality.select("channel", "timestep", "seed").n_unique()
    assert sorted(set(quality["channel"])) == DREAM_CHANNELS


# ------------------------------------------------------------- preemption, requeue and time limits
def _finished_batches(root: Path) -> dict[int, int]:
    """batch index -> mtime (ns) of its dense file, for every finished capture batch under ``root``."""
    from ddr_core.activation_store import ActivationStore

    if not (root / "manifest.json").is_file() and not root.is_dir():
        return {}
    store = ActivationStore(root)
    return {i: store.dense_path("tiny-raw", i).stat().st_mtime_ns for i in store.finished_batches()}


def _requeue_midway(job_name: str, finished, stop: threading.Event, timeout: float = 300):
    """A thread that, once ``finished()`` is not empty, ``scontrol requeue``s the running job whose name
    contains ``job_name`` (what a preemption with PreemptMode=REQUEUE does), waits until Slurm has killed
    it, records ``finished()`` then in ``.before``, and lets the requeued job start at once (a requeued
    job is held ~2 min by Slurm before it may start again). ``.jobs``: the ids it requeued."""
    jobs: list[str] = []
    before: dict = {}

    def watch():
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            if finished():
                running = [line.split() for line in on_cluster("squeue -h -t R -o '%A %j'").splitlines()]
                mine = [job for job, name in running if job_name in name]
                if mine:
                    jobs.extend(mine)
                    on_cluster(f"scontrol requeue {mine[0]}")
                    while on_cluster(f"squeue -h -j {mine[0]} -o %T") in ("RUNNING", "COMPLETING"):
                        time.sleep(0.1)
                    before.update(finished())
                    on_cluster(f"scontrol update jobid={mine[0]} starttime=now 2>/dev/null || true")
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.jobs, thread.before = jobs, before
    thread.start()
    return thread


def _assert_dreams_equal(out_dir: Path, local_dir: Path, channels: list[int]) -> None:
    def latents(folder: Path) -> list[Path]:
        return sorted(p.relative_to(folder) for p in folder.rglob("latents.safetensors")
                      if int(p.relative_to(folder).parts[0].removeprefix("channel_")) in channels)

    names = latents(local_dir)
    assert names and names == latents(out_dir)
    for name in names:
        a, b = load_file(out_dir / name), load_file(local_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=f"{name}:{key}")


@pytest.mark.skipif(SKIP is None and not LOCAL_ADMIN,
                    reason="needs Slurm admin rights (DDR_SLURM_USER=root: the local test cluster)")
def test_requeue_mid_capture_resumes_without_redoing_batches_and_equals_local(chains):
    """``scontrol requeue`` (a preemption) of a capture job after its first batch: the run still succeeds
    (dagster-slurm follows the requeued job, or the wrapper cancels it and Dagster retries the step), the
    finished batches are not written again, and the store equals an uninterrupted in-process capture."""
    root, _, instance = chains
    config = {**CAPTURE, "n_prompts": 12, "batch_size": 2}
    local = materialize("activations", "tiny", root, instance, config=config, experiment="requeue-capture-local")
    assert local.success, step_error(local)
    store_dir = root / "outputs/requeue-capture/activations/tiny"
    stop = threading.Event()
    watcher = _requeue_midway("dagster_activations", lambda: _finished_batches(store_dir), stop)
    try:
        result = materialize("activations", "tiny", root, instance, "slurm", config, experiment="requeue-capture")
    finally:
        stop.set()
        watcher.join(60)
    assert watcher.jobs, "the capture job finished before it could be requeued"
    assert result.success, step_error(result)
    before, after = watcher.before, _finished_batches(store_dir)
    n_batches = config["n_prompts"] // config["batch_size"]
    assert 1 <= len(before) < n_batches, before  # requeued mid-capture
    assert set(after) == set(range(n_batches))
    assert {i: after[i] for i in before} == before  # the finished batches were not redone
    assert metadata(result, "activations")["batches_resumed"] == len(before)
    local_dir = root / "outputs/requeue-capture-local/activations/tiny"
    files = sorted(p.relative_to(local_dir) for p in local_dir.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(store_dir) for p in store_dir.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(store_dir / name), load_file(local_dir / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def dream_inputs(chains):
    """Two more experiments, ``requeue`` (dreams on SLURM) and ``requeue-local`` (the uninterrupted
    in-process reference), each with an in-process ``activations[tiny]`` and ``timestep_stats[tiny-raw]``:
    their dream folders are theirs alone (the other tests count every channel of theirs)."""
    root, _, instance = chains
    for experiment in ("requeue", "requeue-local"):
        for name, key, config in [("activations", "tiny", CAPTURE), ("timestep_stats", "tiny-raw", STATS)]:
            result = materialize(name, key, root, instance, config=config, experiment=experiment)
            assert result.success, step_error(result)
    return root, instance


def _dreams_midway(root: Path, instance, config: dict, watcher_for) -> tuple[dg.ExecuteInProcessResult, object]:
    """Dreams of ``config`` on SLURM in ``requeue`` with ``watcher_for(finished)`` interfering."""
    out_dir = root / "outputs/requeue/dreams/tiny-raw"
    stop = threading.Event()
    watcher = watcher_for(lambda: _finished(out_dir) if out_dir.is_dir() else {}, stop)
    try:
        result = materialize("dreams", "tiny-raw:0-15", root, instance, "slurm", config, experiment="requeue")
    finally:
        stop.set()
        watcher.join(60)
    return result, watcher


@pytest.mark.skipif(SKIP is None and not LOCAL_ADMIN,
                    reason="needs Slurm admin rights (DDR_SLURM_USER=root: the local test cluster)")
def test_requeue_mid_dreams_resumes_without_redoing_channels_and_equals_local(dream_inputs):
    """``scontrol requeue`` of a dreams job after its first channel: the run succeeds, the finished
    channels are not redone, the dreams equal an uninterrupted in-process run."""
    root, instance = dream_inputs
    channels = [4, 5, 6, 7]
    config = {**DREAMS, "channels": channels}
    local = materialize("dreams", "tiny-raw:0-15", root, instance, config=config, experiment="requeue-local")
    assert local.success, step_error(local)
    result, watcher = _dreams_midway(root, instance, config,
                                     lambda finished, stop: _requeue_midway("dagster_dreams__", finished, stop))
    assert watcher.jobs, "the dreams job finished before it could be requeued"
    assert result.success, step_error(result)
    out_dir = root / "outputs/requeue/dreams/tiny-raw"
    before, after = watcher.before, _finished(out_dir)
    assert 1 <= len(before) < len(channels), before
    assert set(after) == set(channels)
    assert {c: after[c] for c in before} == before  # finished channels were not redone
    meta = metadata(result, "dreams")
    assert meta["channels_resumed"] == len(before) and meta["channels_done"] == len(channels) - len(before)
    _assert_dreams_equal(out_dir, root / "outputs/requeue-local/dreams/tiny-raw", channels)


def _time_limit_after_first_channel(finished, stop: threading.Event, timeout: float = 300):
    """A thread that, as soon as the dreams job runs, sets its time limit to two minutes (``scontrol update``:
    after 10 s fewer seconds than its signal lead remain, and Slurm sends the signal at its next check, as it
    would near the end of a long job; the payload stops after the channel in progress, so at least one is
    finished), then records ``finished()`` in ``.before`` when that job has ended. ``.jobs``: that job's id.
    Not "after the first channel": on an idle machine the rest of the job could end before Slurm's next check."""
    jobs: list[str] = []
    before: dict = {}

    def watch():
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            if not jobs:
                running = [line.split() for line in on_cluster("squeue -h -t R -o '%A %j'").splitlines()]
                mine = [job for job, name in running if "dagster_dreams__" in name]
                if mine:
                    jobs.append(mine[0])
                    on_cluster(f"scontrol update jobid={mine[0]} timelimit=2")
            if jobs and on_cluster(f"squeue -h -j {jobs[0]} -o %T") not in ("RUNNING", "COMPLETING"):
                before.update(finished())
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.jobs, thread.before = jobs, before
    thread.start()
    return thread


@pytest.mark.slow
def test_time_limit_signal_stops_after_a_channel_and_the_retry_resumes_and_equals_local(dream_inputs):
    """Slurm's signal before the time limit (``signal_before_timeout: 110``, ``--signal=B:USR1@110``)
    reaches the payload, which stops after the channel in progress and reports ``interrupted``; the
    wrapper asks Dagster to retry the step (``RetryRequested``, no daemon) and the new job resumes. The
    run succeeds, the first job's channels are not redone, the dreams equal an uninterrupted local run.

    Slurm limits have one-minute granularity: the first job's limit drops from 5 to 2 minutes as soon as it
    runs (after 10 s fewer than 110 s remain, so the signal is due at Slurm's next check, within ~30 s); the
    job has minutes of work, so it is still running then; the retry keeps 5 minutes and finishes."""
    root, instance = dream_inputs
    channels = list(range(8, 16))
    config = {**DREAMS, "channels": channels, "num_steps": 240,
              "slurm": {"time_limit": "00:05:00", "signal_before_timeout": 110, "retries": 2}}
    local = materialize("dreams", "tiny-raw:0-15", root, instance,
                        config={k: v for k, v in config.items() if k != "slurm"}, experiment="requeue-local")
    assert local.success, step_error(local)
    result, watcher = _dreams_midway(root, instance, config, _time_limit_after_first_channel)
    assert result.success, step_error(result)
    (first,) = watcher.jobs
    accounted = on_cluster(f"sacct -X -n -P -j {first} -o State,Timelimit").split("|")
    assert accounted == ["FAILED", "00:02:00"], accounted  # it stopped itself before the limit
    assert [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"], "no retry"
    out_dir = root / "outputs/requeue/dreams/tiny-raw"
    before = {c: t for c, t in watcher.before.items() if c in channels}
    after = {c: t for c, t in _finished(out_dir).items() if c in channels}
    assert 1 <= len(before) < len(channels), before
    assert set(after) == set(channels)
    assert {c: after[c] for c in before} == before  # the first job's channels were not redone
    assert metadata(result, "dreams")["channels_resumed"] == len(before)
    _assert_dreams_equal(out_dir, root / "outputs/requeue-local/dreams/tiny-raw", channels)


def test_timestep_stats_sharded_as_slurm_jobs_equals_one_run(chains, tmp_path):
    """``timestep_stats`` with ``channel_shards: 2`` in compute mode slurm: each channel range is one SLURM
    job (stage ``timestep_stats_shard``), merged in the asset; the folder equals the one-run statistics."""
    from tests.test_statistics_shards import assert_same_statistics

    root, _, instance = chains
    stats_dir = root / "outputs/slurm/timestep_stats/tiny-raw"
    single = tmp_path / "single"
    shutil.copytree(stats_dir, single)  # chains computed it in one in-process run
    result = materialize("timestep_stats", "tiny-raw", root, instance, "slurm",
                         {**STATS, "channel_shards": 2, "slurm": {"time_limit": "00:10:00"}}, experiment="slurm")
    assert result.success, step_error(result)
    meta = metadata(result, "timestep_stats")
    assert meta["channel_shards"] == 2 and len(meta["slurm_job_ids"]) == 2
    for job in meta["slurm_job_ids"]:
        assert on_cluster(f"sacct -X -n -P -j {job} -o State,Timelimit").split("|") == ["COMPLETED", "00:10:00"]
    assert_same_statistics(single, stats_dir)
    assert not (root / "outputs/slurm/timestep_stats/.tiny-raw.shards").exists()  # removed after the merge


def test_channel_shards_run_as_parallel_slurm_jobs(chains, tmp_path):
    """Issue #19 item 2: ``channel_shards: 3`` in compute mode slurm submits the unfinished shards as SLURM jobs
    all at once (the second is queued before the first has ended; with CPUs for both they run at the same
    time), skips a shard an earlier attempt finished, and the merge equals the one-run statistics. The same
    config in compute mode local runs the shards one after the other in process, with the same result."""
    from ddr_core.activation_store import ActivationStore
    from ddr_core.statistics import TimestepStatsConfig
    from ddr_core.statistics_shards import channel_ranges, compute_stats_shard
    from tests.test_statistics_shards import assert_same_statistics

    root, _, instance = chains
    single = {}
    for where in ("slurm", "local"):
        single[where] = tmp_path / where
        shutil.copytree(root / f"outputs/{where}/timestep_stats/tiny-raw", single[where])
    store = ActivationStore(root / "outputs/slurm/activations/tiny")
    ranges = channel_ranges(store.width("tiny-raw"), 3)
    shards_dir = root / "outputs/slurm/timestep_stats/.tiny-raw.shards"
    compute_stats_shard(store, "tiny-raw", ranges[1], TimestepStatsConfig(**STATS), shards_dir)  # "an earlier attempt"

    result = materialize("timestep_stats", "tiny-raw", root, instance, "slurm",
                         {**STATS, "channel_shards": 3, "slurm": {"time_limit": "00:10:00"}}, experiment="slurm")
    assert result.success, step_error(result)
    meta = metadata(result, "timestep_stats")
    assert meta["channel_shards"] == 3 and meta["channel_shards_run"] == 2 and len(meta["slurm_job_ids"]) == 2
    rows = [line.split("|") for line in on_cluster(
        f"sacct -X -n -P -j {','.join(meta['slurm_job_ids'])} -o State,Submit,Start,End").splitlines()]
    assert [r[0] for r in rows] == ["COMPLETED", "COMPLETED"], rows
    submits, starts, ends = ([r[i] for r in rows] for i in (1, 2, 3))  # ISO times sort as strings
    assert max(submits) < min(ends), rows  # both queued before either ended: not one after the other
    if int(on_cluster("sinfo -h -o %c").split()[0]) >= 2:
        assert max(starts) < min(ends), rows  # and they ran at the same time
    assert_same_statistics(single["slurm"], root / "outputs/slurm/timestep_stats/tiny-raw")
    assert not shards_dir.exists()

    local = materialize("timestep_stats", "tiny-raw", root, instance, "local", {**STATS, "channel_shards": 3},
                        experiment="local")
    assert local.success, step_error(local)
    assert metadata(local, "timestep_stats")["channel_shards_run"] == 3
    assert_same_statistics(single["local"], root / "outputs/local/timestep_stats/tiny-raw")
