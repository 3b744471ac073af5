"""Failure modes of the priors and dreams stages.

A real ``kill -9`` mid-run then a re-run, a full disk while a channel is written, NaN/inf in one
channel's dream (through Dagster, with the ``dream_quality`` check), two runs on the same channels at
once (channel claims, two processes), and bad input caught before any work with nothing written. The
priors/dreams rows of docs/FAILURE_MODES.md point here.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from ddr_assets.dreams import quality_check
from ddr_core import atomic
from ddr_core.config import ProjectConfig
from ddr_core.dreams import (
    DreamConfig,
    DreamObjective,
    channel_files,
    dreams_for_variant,
    finished_channels,
    measure_dream_quality,
    run_dreams,
)
from ddr_core.locks import is_locked
from ddr_core.paths import DataLayout
from ddr_core.priors import (
    ChannelsLockedError,
    PriorsConfig,
    priors_for_variant,
    read_prior,
    run_priors,
    stage_locks_dir,
)
from ddr_core.tiny_model import TINY_TARGET_LAYER
from tests.test_assets import _error, _materialize
from tests.test_dreams import _write_priors, _write_stats
from tests.test_priors import hand_made_stats

ROOT = Path(__file__).resolve().parents[1]

# Priors: channels 0, 5, 7 are active in the hand-made statistics (each generated), 9 is inactive.
PRIORS_CONFIG = {"n_results": 2, "seeds": [1024, 1111], "num_inference_steps": 4, "batch_size": 2}
# Dreams from hand-made priors: channel 0 has 3 timesteps, 1 has 1, 2 has 2 (x 2 seeds each).
DREAMS_CONFIG = {"timesteps": [20, "activity_peaks"], "n_results": 2, "num_steps": 4, "snapshot_every": 2,
                 "batch_size": 4, "quality_noise_draws": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def raw_stats(tmp_path_factory) -> Path:
    return hand_made_stats(tmp_path_factory.mktemp("raw_stats"), 64)


@pytest.fixture
def dream_inputs(tiny_pipe, tmp_path) -> tuple[Path, Path]:
    """Hand-made statistics and priors of channels 0-3 (``stats``, ``priors``) under ``tmp_path``."""
    stats_dir, priors_dir = tmp_path / "stats", tmp_path / "priors"
    _write_stats(stats_dir)
    _write_priors(priors_dir, tiny_pipe, [0, 1, 2, 3])
    return stats_dir, priors_dir


# ---- helpers -------------------------------------------------------------------------------------

# A priors or dreams run in its own process that stops, mid-write, at the first write whose destination
# ends with `stall_at` (priors: after the image went to its temporary, before the rename; dreams: after
# the channel's temporary folder is complete, before its rename), prints "stalled" and waits there until
# the file `release` exists. The test then kills it (kill -9) or releases it.
STALLED_RUN = textwrap.dedent("""
    import contextlib, json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import ddr_core.dreams as dreams
    import ddr_core.dreams.channel_files as dream_files
    import ddr_core.priors as priors
    from ddr_core.pipeline import load_pipeline
    from ddr_core.tiny_model import TINY_TARGET_LAYER

    args = json.loads(sys.argv[1])
    release, stalled = Path(args["release"]), []

    def stalling(real):
        @contextlib.contextmanager
        def wrapper(path):
            with real(path) as tmp:
                yield tmp
                if not stalled and str(path).endswith(args["stall_at"]):
                    stalled.append(path)
                    print("stalled", flush=True)
                    while not release.exists():
                        time.sleep(0.05)
        return wrapper

    pipe = load_pipeline(Path(args["model_dir"]))
    if args["stage"] == "priors":
        priors.atomic_path = stalling(priors.atomic_path)
        priors.run_priors(pipe, None, TINY_TARGET_LAYER, Path(args["stats"]), args["channels"], Path(args["out"]),
                          priors.PriorsConfig(**args["config"]), Path(args["root"]), lock_owner="run A")
    else:
        dream_files.atomic_dir = stalling(dream_files.atomic_dir)
        config = dreams.DreamConfig(**args["config"])
        dreams.run_dreams(pipe, None, TINY_TARGET_LAYER, Path(args["stats"]), Path(args["priors"]),
                          args["channels"], Path(args["out"]), config, data_root=Path(args["root"]),
                          lock_owner="run A")
        dreams.measure_dream_quality(pipe, None, TINY_TARGET_LAYER, Path(args["out"]), Path(args["stats"]), config)
    print("finished", flush=True)
""")


def start_stalled_run(tmp_path: Path, **args) -> subprocess.Popen:
    """Start :data:`STALLED_RUN` and return once it stalls (``args["release"]`` is set here)."""
    args = {"release": str(tmp_path / "release"), **args}
    log = open(tmp_path / "run_a.stderr", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen([sys.executable, "-c", STALLED_RUN, json.dumps(args)], stdout=subprocess.PIPE,
                               stderr=log, text=True, cwd=ROOT)
    process.log = log  # type: ignore[attr-defined]
    line = process.stdout.readline()
    assert line.strip() == "stalled", (line, (tmp_path / "run_a.stderr").read_text()[-3000:])
    return process


def kill_9(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    process.log.close()  # type: ignore[attr-defined]


def wait_for(process: subprocess.Popen) -> int:
    """Wait for a released run to finish; its exit status."""
    status = process.wait(timeout=120)
    process.log.close()  # type: ignore[attr-defined]
    return status


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if atomic.is_temp_name(p.name)]


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def claims(out_dir: Path) -> list[Path]:
    return sorted(stage_locks_dir(out_dir).glob("claim-*"))


class FailingOs:
    """``ddr_core.atomic``'s view of ``os``: ``os.replace`` onto a destination ending with ``suffix``
    fails with ENOSPC (only the atomic write layer sees it; the real ``os`` module is not patched)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.failures = 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, src, dst) -> None:
        if str(dst).endswith(self.suffix):
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.replace(src, dst)


def assert_same_latents(folder: Path, reference: Path) -> None:
    names = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("latents.safetensors"))
    assert names and names == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("latents.safetensors"))
    for name in names:
        got, want = load_file(str(folder / name)), load_file(str(reference / name))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4, msg=f"{name}:{key}")


# ---- 1. kill -9 mid-run, then a re-run -------------------------------------------------------------

def test_kill_9_of_a_priors_run_then_rerun(tiny_model_dir, tiny_pipe, raw_stats, tmp_path):
    out, channels = tmp_path / "run" / "priors", [0, 5, 7, 9]
    run_a = start_stalled_run(tmp_path, stage="priors", model_dir=str(tiny_model_dir), stats=str(raw_stats),
                              out=str(out), root=str(tmp_path / "run"), channels=channels, config=PRIORS_CONFIG,
                              stall_at="channel_00005/seed_1024.png")
    kill_9(run_a)
    # Killed mid-channel: 0 and 9 finished, 5 half written (latents, a temporary image), 7 not started.
    assert read_prior(out, 0)["status"] == "done" and read_prior(out, 9)["status"] == "skipped"
    assert read_prior(out, 5) is None and (out / "channel_00005" / "latents.safetensors").is_file()
    assert temporaries(out), "the kill should have left the image it was writing"
    assert claims(out) and not any(is_locked(c) for c in claims(out) if c.suffix == ".lock")  # died with it
    before = {name: value for name, value in files_of(out).items() if name.startswith(("channel_00000", "channel_00009"))}

    again = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, channels, out, PriorsConfig(**PRIORS_CONFIG),
                       tmp_path / "run")
    assert again.resumed == [0, 9] and again.done == [5, 7] and again.skipped == {}
    after = files_of(out)
    assert all(after[name] == before[name] for name in before), "finished channels were redone"
    assert not temporaries(out, stage_locks_dir(out)) and claims(out) == []

    reference = tmp_path / "reference" / "priors"
    run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, channels, reference, PriorsConfig(**PRIORS_CONFIG),
               tmp_path / "reference")
    assert sorted(after) == sorted(files_of(reference))
    assert_same_latents(out, reference)
    for channel in channels:  # same records (paths are relative to each run's data root)
        assert read_prior(out, channel) == read_prior(reference, channel)


@pytest.mark.slow
def test_kill_9_of_a_dreams_run_then_rerun(tiny_model_dir, tiny_pipe, dream_inputs, tmp_path):
    stats_dir, priors_dir = dream_inputs
    config = DreamConfig(**DREAMS_CONFIG)
    out = tmp_path / "run" / "dreams"
    # An earlier run finished (and measured) channel 0.
    run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, stats_dir, priors_dir, [0], out, config, data_root=tmp_path)
    measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, out, stats_dir, config)
    before = {name: value for name, value in files_of(out).items() if name.startswith("channel_00000")}
    assert "channel_00000/quality.parquet" in before

    run_a = start_stalled_run(tmp_path, stage="dreams", model_dir=str(tiny_model_dir), stats=str(stats_dir),
                              priors=str(priors_dir), out=str(out), root=str(tmp_path), channels=[0, 1, 2],
                              config=DREAMS_CONFIG, stall_at="channel_00001")
    kill_9(run_a)
    assert finished_channels(out) == {0}
    assert [p.name.split(".tmp-")[0] for p in temporaries(out)] == [".channel_00001"]  # a complete, unrenamed folder

    run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, stats_dir, priors_dir, [0, 1, 2], out, config, data_root=tmp_path)
    quality = measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, out, stats_dir, config)
    assert finished_channels(out) == {0, 1, 2}
    after = files_of(out)
    assert all(after[name] == before[name] for name in before), "channel 0 was redone or re-measured"
    assert not temporaries(out, stage_locks_dir(out)) and claims(out) == []

    reference = tmp_path / "reference" / "dreams"
    run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, stats_dir, priors_dir, [0, 1, 2], reference, config,
               data_root=tmp_path)
    expected = measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, reference, stats_dir, config)
    assert_same_latents(out, reference)
    table = pl.read_parquet(out / "quality.parquet")
    keys = ["channel", "timestep", "seed"]
    assert table.height == 2 * (3 + 1 + 2) == table.select(keys).n_unique()  # no duplicated rows
    assert table.sort(keys).equals(quality.sort(keys))
    np.testing.assert_allclose(table.sort(keys)["dream_activation"].to_numpy(),
                               expected.sort(keys)["dream_activation"].to_numpy(), rtol=1e-3, atol=1e-4)


# ---- 2. disk full while a channel is written ---------------------------------------------------------

def test_disk_full_while_writing_a_prior_keeps_finished_channels(tiny_pipe, raw_stats, tmp_path, monkeypatch):
    out, config = tmp_path / "priors", PriorsConfig(**PRIORS_CONFIG)
    faulty = FailingOs("channel_00005/seed_1024.png")
    monkeypatch.setattr(atomic, "os", faulty)
    with pytest.raises(OSError) as error:
        run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [0, 5, 7], out, config, tmp_path)
    monkeypatch.setattr(atomic, "os", os)
    assert error.value.errno == errno.ENOSPC and faulty.failures == 1
    message = str(error.value)
    assert "No space left on device" in message and str(out / "channel_00005" / "seed_1024.png") in message
    prior = read_prior(out, 0)  # the finished channel is still complete and readable
    assert prior["status"] == "done" and all((tmp_path / path).is_file() for path in prior["images"])
    assert load_file(str(tmp_path / prior["latents"]))["latents"].shape == (2, 4, 8, 8)
    assert read_prior(out, 5) is None and read_prior(out, 7) is None  # not half-counted
    assert not temporaries(out, stage_locks_dir(out)) and claims(out) == []  # the claim was released
    again = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [0, 5, 7], out, config, tmp_path)
    assert again.resumed == [0] and again.done == [5, 7]


@pytest.mark.parametrize("where", ["safetensors writer", "folder rename"])
def test_disk_full_while_writing_a_dream_keeps_finished_channels(tiny_pipe, tmp_path, monkeypatch, where):
    config = DreamConfig(timesteps=[20], use_prior=False, n_results=1, seeds=[3], num_steps=2, snapshot_every=0,
                         batch_size=1, quality_noise_draws=1)
    out = tmp_path / "dreams"
    if where == "safetensors writer":
        real_save = channel_files.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if ".channel_00001.tmp-" in str(filename):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
            return real_save(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(channel_files, "save_file", save_file)
    else:
        monkeypatch.setattr(atomic, "os", FailingOs("channel_00001"))
    with pytest.raises(OSError) as error:
        run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, None, None, [0, 1], out, config)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert "No space left on device" in str(error.value) and str(out / "channel_00001") in str(error.value)
    assert finished_channels(out) == {0} and not (out / "channel_00001").exists()
    assert load_file(str(out / "channel_00000" / "t_0020" / "latents.safetensors"))["latents"].shape == (1, 4, 8, 8)
    assert not temporaries(out, stage_locks_dir(out)) and claims(out) == []
    again = run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, None, None, [0, 1], out, config)
    assert again.channels_skipped == [0] and again.channels_done == [1]


def test_disk_full_while_writing_the_quality_table_keeps_the_previous_one(tiny_pipe, tmp_path, monkeypatch):
    config = DreamConfig(timesteps=[20], use_prior=False, n_results=1, seeds=[3], num_steps=2, snapshot_every=0,
                         batch_size=2, quality_noise_draws=1)
    out = tmp_path / "dreams"
    run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, None, None, [0], out, config)
    measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, out, None, config)
    run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, None, None, [1], out, config)
    monkeypatch.setattr(atomic, "os", FailingOs("dreams/quality.parquet"))
    with pytest.raises(OSError, match="No space left on device") as error:
        measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, out, None, config)
    monkeypatch.undo()
    assert str(out / "quality.parquet") in str(error.value)
    assert pl.read_parquet(out / "quality.parquet")["channel"].to_list() == [0]  # the previous union, readable
    assert not temporaries(out)
    table = measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, out, None, config)
    assert table["channel"].to_list() == [0, 1] == pl.read_parquet(out / "quality.parquet")["channel"].to_list()


# ---- 3. NaN/inf in one channel's dream: recorded, the others finish, the check fails --------------------

def _table(rows: list[tuple]) -> pl.DataFrame:
    """Quality rows ``(channel, dream_activation, prior_activation, failed)``."""
    from ddr_core.dreams import QUALITY_SCHEMA

    return pl.DataFrame([{"channel": c, "timestep": 20, "seed": 1, "dream_activation": d, "prior_activation": p,
                          "top_example_activation": 2.0, "example_timestep": 21,
                          "ratio": None if d is None else d / 2.0, "failed": f} for c, d, p, f in rows],
                        schema=QUALITY_SCHEMA)


def test_quality_check_on_hand_made_tables():
    healthy = quality_check(_table([(0, 2.0, 1.0, False), (1, 3.0, 1.0, False), (2, 1.5, 1.4, False)]))
    assert healthy.passed and "100% of dreams raised" in healthy.description
    assert healthy.metadata["failed_channels"].value == []
    nan = quality_check(_table([(0, 2.0, 1.0, False), (7, float("nan"), 1.0, False), (8, float("inf"), 1.0, False)]))
    assert not nan.passed and "channels [7, 8]" in nan.description
    assert nan.metadata["failed_channels"].value == [7, 8]
    failed = quality_check(_table([(0, 2.0, 1.0, False), (3, 2.0, 1.0, True), (4, None, 1.0, False)]))
    assert not failed.passed and "2 dream(s) failed or non-finite, channels [3, 4]" in failed.description
    flat = quality_check(_table([(0, 0.5, 1.0, False), (1, 0.9, 1.0, False), (2, 0.7, 1.0, False),
                                 (3, 2.0, 1.0, False)]))
    assert not flat.passed and "only 25% of dreams raised the activation" in flat.description
    assert "failed" not in flat.description
    empty = quality_check(_table([]))
    assert not empty.passed and empty.description == "no dreams to check"


@pytest.fixture(scope="module")
def dagster_stats(tmp_path_factory):
    """models, saes, prompts, activations and timestep_stats[tiny-raw] materialized with tiny settings."""
    data_root = tmp_path_factory.mktemp("dagster")
    instance = dg.DagsterInstance.ephemeral()
    for name, key, config in [
        ("models", "tiny", None),
        ("saes", "tiny-sae", None),
        ("prompt_datasets", "tiny-prompts", None),
        ("activations", "tiny", {"n_prompts": 4, "batch_size": 4, "num_inference_steps": 4, "seed": 1}),
        ("timestep_stats", "tiny-raw", {"top_k": 5, "peak_separation": 50}),
    ]:
        result = _materialize(name, key, data_root, instance, config)
        assert result.success, _error(result)
    return data_root, instance


def test_nan_in_one_channel_through_dagster_fails_the_quality_check(dagster_stats, monkeypatch):
    data_root, instance = dagster_stats
    real = DreamObjective.activations

    def poisoned(self, layer_output, rows=None):  # channel 1's objective is NaN, the others are untouched
        values = real(self, layer_output, rows)
        channels = (self.channels if rows is None else self.channels[rows]).to(values.device)
        return torch.where(channels == 1, torch.full_like(values, float("nan")), values)

    monkeypatch.setattr(DreamObjective, "activations", poisoned)
    result = _materialize("dreams", "tiny-raw:0-15", data_root, instance, {
        "channels": [0, 1, 2], "use_prior": False, "n_results": 1, "seeds": [5], "timesteps": ["20"],
        "num_steps": 3, "snapshot_every": 0, "quality_noise_draws": 1, "batch_size": 3})
    assert result.success, _error(result)  # the materialization succeeds; the check reports the failure
    event = result.get_asset_materialization_events()[0]
    assert event.materialization.metadata["failed_dreams"].value == 1
    out = data_root / "outputs" / "default" / "dreams" / "tiny-raw"
    assert finished_channels(out) == {0, 1, 2}
    failed = json.loads((out / "channel_00001" / "dream.json").read_text())
    assert failed["failures"] == [{"channel": 1, "timestep": 20, "seed": 5, "step": 0,
                                   "reason": "non-finite activation at step 0"}]
    for channel in (0, 2):  # the others finished normally
        dream = json.loads((out / f"channel_{channel:05d}" / "dream.json").read_text())
        assert dream["failures"] == [] and np.isfinite(dream["results"]["20"]["final_activation"]).all()
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "dream_quality" and not check.passed
    assert "channels [1]" in check.description
    assert check.metadata["failed_channels"].value == [1]


# ---- 4. two runs on the same channels at once ---------------------------------------------------------

@pytest.mark.slow
def test_priors_runs_on_the_same_channels_never_interleave(tiny_model_dir, tiny_pipe, raw_stats, tmp_path):
    out, config, root = tmp_path / "priors", PriorsConfig(**PRIORS_CONFIG), tmp_path
    run_a = start_stalled_run(tmp_path, stage="priors", model_dir=str(tiny_model_dir), stats=str(raw_stats),
                              out=str(out), root=str(root), channels=[0, 5], config=PRIORS_CONFIG,
                              stall_at="channel_00005/seed_1024.png")
    try:
        in_flight = temporaries(out)
        assert len(in_flight) == 1  # run A's image of channel 5, not yet renamed
        with pytest.raises(ChannelsLockedError) as error:
            run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [5, 7], out, config, root)
        message = str(error.value)
        assert error.value.channels == [5] and "channel(s) [5]" in message
        assert f"pid {run_a.pid}" in message and "run A" in message and "claim-" in message
        assert "do not delete" in message
        assert read_prior(out, 7) is None  # the refused run wrote nothing
        with pytest.raises(ChannelsLockedError, match="waited"):
            run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [5], out, config, root, lock_wait=0.3)
        # Other channels of the same variant (another block) run side by side, leaving A's files alone.
        beside = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [7, 20], out, config, root)
        assert beside.done == [7] and beside.skipped == {20: "inactive"}
        assert temporaries(out) == in_flight and run_a.poll() is None
        # A queued run waits for A to finish, then finds its channels done: nothing is done twice.
        threading.Timer(0.5, (tmp_path / "release").touch).start()
        queued = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [0, 5], out, config, root, lock_wait=120)
        assert queued.resumed == [0, 5] and queued.done == []
        assert wait_for(run_a) == 0
    finally:
        if run_a.poll() is None:
            kill_9(run_a)
    assert run_a.stdout.read().strip() == "finished"
    assert read_prior(out, 5)["status"] == "done" and claims(out) == [] and not temporaries(out)


@pytest.mark.slow
def test_dreams_runs_on_the_same_channels_never_interleave(tiny_model_dir, tiny_pipe, dream_inputs, tmp_path):
    stats_dir, priors_dir = dream_inputs
    config, out = DreamConfig(**DREAMS_CONFIG), tmp_path / "dreams"
    run_a = start_stalled_run(tmp_path, stage="dreams", model_dir=str(tiny_model_dir), stats=str(stats_dir),
                              priors=str(priors_dir), out=str(out), root=str(tmp_path), channels=[0, 1, 2],
                              config=DREAMS_CONFIG, stall_at="channel_00001")
    try:
        with pytest.raises(ChannelsLockedError, match=rf"channel\(s\) \[1, 2\].*pid {run_a.pid}.*run A"):
            run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, stats_dir, priors_dir, [1, 2, 3], out, config,
                       data_root=tmp_path)
        assert finished_channels(out) == {0}  # A's channel 0; the refused run wrote nothing
        # Another block (channel 3) runs and is measured while A is still writing channel 1.
        run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, stats_dir, priors_dir, [3], out, config, data_root=tmp_path)
        measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, out, stats_dir, config, channels=[3])
        assert finished_channels(out) == {0, 3} and run_a.poll() is None
        assert [p.name.split(".tmp-")[0] for p in temporaries(out)] == [".channel_00001"]  # A's, left alone
        (tmp_path / "release").touch()
        assert wait_for(run_a) == 0
    finally:
        if run_a.poll() is None:
            kill_9(run_a)
    assert finished_channels(out) == {0, 1, 2, 3} and claims(out) == [] and not temporaries(out)
    table = pl.read_parquet(out / "quality.parquet")  # both runs' rows, none lost, none twice
    assert sorted(set(table["channel"].to_list())) == [0, 1, 2, 3]
    assert table.height == table.select("channel", "timestep", "seed").n_unique() == 2 * (3 + 1 + 2 + 1)


# ---- 5. bad input: a clear error before any work, nothing written ---------------------------------------

PROJECT = {
    "models": {"tiny": {"source": {"builtin": "tiny"}}},
    "saes": {"tiny-sae": {"source": {"builtin": "tiny-sae"}}},
    "prompt_datasets": {"tiny-prompts": {"source": {"builtin": "tiny-prompts"}}},
    "variants": {"tiny-raw": {"model": "tiny", "prompts": "tiny-prompts", "width": 64, "block_size": 16}},
}


@pytest.fixture
def stage(tmp_path, tiny_model_dir, raw_stats) -> tuple[ProjectConfig, DataLayout]:
    """A data root with the tiny model and (a link to) hand-made statistics of ``tiny-raw``."""
    layout = DataLayout(tmp_path / "data")
    layout.model_dir("tiny").parent.mkdir(parents=True)
    layout.model_dir("tiny").symlink_to(tiny_model_dir)
    layout.timestep_stats_dir("tiny-raw").parent.mkdir(parents=True)
    layout.timestep_stats_dir("tiny-raw").symlink_to(raw_stats)
    return ProjectConfig.model_validate(PROJECT), layout


def _stage_call(case: str, project: ProjectConfig, layout: DataLayout):
    dream = DreamConfig(timesteps=["activity_peaks"], n_results=1, num_steps=1)
    if case == "priors: channel out of range":
        return lambda: priors_for_variant(project, layout, "tiny-raw", [3, 64], PriorsConfig(**PRIORS_CONFIG), "cpu")
    if case == "dreams: channel out of range":
        return lambda: dreams_for_variant(project, layout, "tiny-raw", [3, 64], dream, "cpu")
    if case in ("priors: statistics missing", "dreams: statistics missing"):
        layout.timestep_stats_dir("tiny-raw").unlink()
        if case.startswith("priors"):
            return lambda: priors_for_variant(project, layout, "tiny-raw", [5], PriorsConfig(**PRIORS_CONFIG), "cpu")
        return lambda: dreams_for_variant(project, layout, "tiny-raw", [5], dream, "cpu")
    if case == "dreams: priors missing":
        return lambda: dreams_for_variant(project, layout, "tiny-raw", [5, 20], dream, "cpu")
    if case == "dreams: timestep beyond the scheduler":
        return lambda: dreams_for_variant(project, layout, "tiny-raw", [5], DreamConfig(timesteps=[0, 1000],
                                                                                       use_prior=False), "cpu")
    raise AssertionError(case)


STAGE_BAD_INPUTS = [
    ("priors: channel out of range", IndexError, r"\[64\] out of range: variant 'tiny-raw'.*valid indices are 0\.\.63"),
    ("dreams: channel out of range", IndexError, r"\[64\] out of range: variant 'tiny-raw'.*valid indices are 0\.\.63"),
    ("priors: statistics missing", FileNotFoundError, r"materialize timestep_stats\[tiny-raw\] first"),
    ("dreams: statistics missing", FileNotFoundError, r"materialize timestep_stats\[tiny-raw\] first"),
    ("dreams: priors missing", FileNotFoundError,
     r"no finished priors for channel\(s\) \[5, 20\].*materialize priors\[tiny-raw:0-15\], "
     r"priors\[tiny-raw:16-31\] first, or set use_prior: false"),
    ("dreams: timestep beyond the scheduler", ValueError, r"timesteps \[1000\] lie outside .* 0\.\.999"),
]


@pytest.mark.parametrize(("case", "error", "message"), STAGE_BAD_INPUTS, ids=[c[0] for c in STAGE_BAD_INPUTS])
def test_bad_input_fails_before_any_work_and_writes_nothing(stage, case, error, message):
    project, layout = stage
    with pytest.raises(error, match=message):
        _stage_call(case, project, layout)()
    for name in ("priors", "dreams"):
        assert not layout.stage_dir(name, "tiny-raw").parent.exists(), f"{case}: {name} output was written"


@pytest.mark.parametrize(("asset", "key", "config", "message"), [
    ("priors", "tiny-raw:0-15", {"n_results": 3, "seeds": [1, 2]}, "seeds has 2 entries but n_results is 3"),
    ("dreams", "tiny-raw:0-15", {"timesteps": ["0", "peaks"]}, "unknown keyword 'peaks'"),
    ("priors", "tiny-raw:0-15", None, "activations[tiny], timestep_stats[tiny-raw] first"),
    ("dreams", "tiny-raw:0-15", {"use_prior": False}, "activations[tiny], timestep_stats[tiny-raw] first"),
], ids=["priors seeds != n_results", "dreams unknown timestep keyword", "priors before timestep_stats",
        "dreams before timestep_stats"])
def test_bad_input_through_dagster_names_the_fix_and_writes_nothing(tmp_path, asset, key, config, message):
    result = _materialize(asset, key, tmp_path, dg.DagsterInstance.ephemeral(), config)
    assert not result.success and message in _error(result)
    assert not (tmp_path / "outputs").exists()


def test_dreams_before_priors_through_dagster_names_the_block(dagster_stats):
    data_root, instance = dagster_stats
    result = _materialize("dreams", "tiny-raw:16-31", data_root, instance, {"num_steps": 1})
    assert not result.success and "materialize priors[tiny-raw:16-31] first" in _error(result)
    out = data_root / "outputs" / "default" / "dreams" / "tiny-raw"
    assert not [c for c in range(16, 32) if (out / f"channel_{c:05d}").exists()]


def test_seeds_not_matching_n_results_is_a_config_error():
    """Core level (also `tests/test_priors.py::test_config_defaults_and_validation_names_fields`)."""
    with pytest.raises(ValidationError, match="seeds has 2 entries but n_results is 3"):
        PriorsConfig(n_results=3, seeds=[1, 2])
