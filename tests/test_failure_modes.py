"""Failure modes of the stages that exist (provisioning, activations, timestep_stats, activity_plots).

Concurrent runs (partition locks), bad input caught before any work with nothing written, and a full
disk during writes. The rows of docs/FAILURE_MODES.md point here and at the older unit tests.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ddr_core import atomic
from ddr_core.activation_store import ActivationStore, VariantBatch
from ddr_core.activations import CaptureConfig, capture_group, run_capture, shard_lock_path
from ddr_core.basis import RawChannels
from ddr_core.config import ProjectConfig
from ddr_core.locks import PartitionLockedError, is_locked, partition_lock, read_lock_owner
from ddr_core.paths import DataLayout, UnsafePathError
from ddr_core.pipeline import LayerNotFoundError, ModelFolderError
from ddr_core.prompts import PromptFileError
from ddr_core.sae import SaeFormatError
from ddr_core.statistics import (
    TimestepStatsConfig,
    compute_timestep_stats,
    connect_stats,
    read_summary,
    stats_lock_path,
)
from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER, build_tiny_sae

ROOT = Path(__file__).resolve().parents[1]

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from ddr_core.locks import partition_lock
    path, owner, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    shared = len(sys.argv) > 4 and sys.argv[4] == "shared"
    with partition_lock(path, owner=owner, shared=shared):
        print("locked", flush=True)
        time.sleep(seconds)
""")


def hold_lock(path: Path, owner: str = "run A", seconds: float = 60.0, shared: bool = False) -> subprocess.Popen:
    """A separate process holding the lock ``path`` (returns once it holds it)."""
    args = [sys.executable, "-c", HOLD_LOCK, str(path), owner, str(seconds)] + (["shared"] if shared else [])
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = process.stdout.readline()
    assert line.strip() == "locked", process.stderr.read()
    return process


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=30)


def synthetic_store(root: Path, n_batches: int = 2, per_batch: int = 3, width: int = 6,
                    timesteps=(900, 500, 100), seed: int = 0) -> ActivationStore:
    rng = np.random.default_rng(seed)
    store = ActivationStore(root)
    for batch in range(n_batches):
        ids = range(batch * per_batch, (batch + 1) * per_batch)
        rows = [{"generation_id": g, "prompt_index": g, "prompt": f"p{g}", "image_index": 0, "seed": g,
                 "image_path": f"images/{g}.png"} for g in ids]
        values = rng.normal(size=(per_batch, len(timesteps), width)).astype(np.float32)
        store.write_batch(batch, rows, list(timesteps), {"raw": VariantBatch(values)})
    store.finalize()
    return store


class FaultyOs:
    """``ddr_core.atomic``'s view of ``os``: ``os.replace`` fails with ENOSPC on call number ``fail_on`` (and
    every later one with ``and_after``).

    Only the atomic write layer sees it (the real ``os`` module is not patched).
    """

    def __init__(self, fail_on: int | None, and_after: bool = False) -> None:
        self.fail_on, self.and_after = fail_on, and_after  # and_after: the disk stays full
        self.replace_calls = 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, src, dst) -> None:
        self.replace_calls += 1
        if self.fail_on is not None and (self.replace_calls == self.fail_on
                                         or (self.and_after and self.replace_calls > self.fail_on)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.replace(src, dst)


# ---- partition locks ----------------------------------------------------------------------------

def test_second_run_fails_at_once_naming_owner_then_kill_9_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / "stage" / ".lock"
    holder = hold_lock(lock, owner="dagster run 1234")
    try:
        start = time.monotonic()
        with pytest.raises(PartitionLockedError) as error, partition_lock(lock):
            pass
        # "at once": no wait (the holder holds for 60 s); the bound sits far from that wait, not near the idle
        # time, so a busy machine does not break it
        assert time.monotonic() - start < 20
        message = str(error.value)
        assert f"pid {holder.pid}" in message and "dagster run 1234" in message and str(lock) in message
        assert "Wait for that run to finish" in message and "do not delete the lock file" in message
        assert read_lock_owner(lock)["pid"] == holder.pid and is_locked(lock)
        with pytest.raises(PartitionLockedError, match=r"waited"):  # a bounded wait gives up too
            with partition_lock(lock, wait=0.3):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    assert not is_locked(lock)  # kill -9: the kernel dropped the lock with the process
    with partition_lock(lock, owner="me") as held:
        assert held.held and read_lock_owner(lock)["owner"] == "me"
    assert read_lock_owner(lock) == {}  # owner information cleared on release


def test_waiting_run_starts_when_the_first_finishes(tmp_path):
    lock = tmp_path / ".lock"
    holder = hold_lock(lock, seconds=0.8)
    start = time.monotonic()
    with partition_lock(lock, wait=60):
        waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert 0.2 < waited < 30


WRITER = textwrap.dedent("""
    import os, sys, time
    from ddr_core.locks import partition_lock
    lock, log = sys.argv[1], sys.argv[2]
    for _ in range(5):
        with partition_lock(lock, wait=60):
            for step in ("start", "end"):
                with open(log, "a") as handle:
                    handle.write(f"{step} {os.getpid()}\\n")
                time.sleep(0.02)
""")


def test_two_processes_writing_one_partition_never_interleave(tmp_path):
    log = tmp_path / "log.txt"
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / ".lock"), str(log)], cwd=ROOT)
                 for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=120) == 0
    lines = log.read_text().split()
    events = list(zip(lines[0::2], lines[1::2], strict=True))
    assert len(events) == 20 and len({pid for _, pid in events}) == 2
    for opened, closed in zip(events[0::2], events[1::2], strict=True):  # start X is always followed by end X
        assert opened[0] == "start" and closed == ("end", opened[1])


def test_timestep_stats_refuses_a_second_writer_and_leaves_the_folder_alone(tmp_path):
    store = synthetic_store(tmp_path / "capture")
    out = tmp_path / "stats" / "raw"
    compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=2))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = hold_lock(stats_lock_path(out), owner="timestep_stats run B")
    try:
        with pytest.raises(PartitionLockedError, match="timestep_stats run B"):
            compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=3))
    finally:
        stop(holder)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture
def capture_root(tmp_path):
    return tmp_path / "outputs" / "activations" / "tiny"


CAPTURE = dict(num_images_per_prompt=1, batch_size=1, num_inference_steps=2, seed=5)


def test_capture_of_the_same_shard_is_refused_before_anything_is_written(tiny_pipe, capture_root, tmp_path):
    holder = hold_lock(shard_lock_path(capture_root, 0, 1), owner="capture run A")
    try:
        with pytest.raises(PartitionLockedError, match="capture run A"):
            run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, TINY_PROMPTS[:2], capture_root,
                        tmp_path, CaptureConfig(**CAPTURE))
    finally:
        stop(holder)
    assert sorted(p.name for p in capture_root.iterdir()) == [".lock.shard-0-of-1"]  # no plan, no batch


@pytest.mark.slow
def test_other_shards_run_side_by_side_and_keep_each_others_files(tiny_pipe, capture_root, tmp_path):
    """Shard 1 of 2 'runs' in another process (holds its shard lock and the shared group lock, and has
    a write in flight); shard 0 runs here: it must not take shard 1's lock, must not delete shard 1's
    in-flight file, and must delete the leftovers of its own killed predecessor."""
    config = dict(CAPTURE, num_shards=2)
    prompts = TINY_PROMPTS[:4]  # batches 0..3: shard 0 takes 0 and 2
    foreign = capture_root / "raw" / "batches" / ".batch_00001.safetensors.tmp-99999-abcd"
    own_leftover = capture_root / "raw" / "batches" / "batch_00002.safetensors"
    for path in (foreign, own_leftover):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    shard_1 = hold_lock(shard_lock_path(capture_root, 1, 2), owner="shard 1")
    group = hold_lock(capture_root / ".lock", owner="shard 1", shared=True)
    try:
        result = run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, prompts, capture_root,
                             tmp_path, CaptureConfig(shard_index=0, **config))
        assert result.batches_done == [0, 2] and result.summary["complete"] is False
        assert foreign.exists(), "shard 0 deleted a file shard 1 was writing"
        assert ActivationStore(capture_root).finished_batches() == {0, 2}
    finally:
        stop(group)
        stop(shard_1)
    result = run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, prompts, capture_root, tmp_path,
                         CaptureConfig(shard_index=1, **config))
    assert result.summary["complete"] and result.summary["generations"] == 4
    assert not foreign.exists()  # alone at the end: finalize removed every leftover


# ---- bad input: a clear error before any work, nothing written -----------------------------------

PROJECT = {
    "models": {"tiny": {"source": {"builtin": "tiny"}}},
    "saes": {"tiny-sae": {"source": {"builtin": "tiny-sae"}}},
    "prompt_datasets": {"tiny-prompts": {"source": {"builtin": "tiny-prompts"}, "file": "prompts.jsonl"}},
    "variants": {
        "tiny-raw": {"model": "tiny", "prompts": "tiny-prompts", "width": 64, "block_size": 16},
        "tiny-sae": {"model": "tiny", "basis": "sae", "sae": "tiny-sae", "prompts": "tiny-prompts", "width": 256},
    },
}


@pytest.fixture
def stage(tmp_path, tiny_model_dir, tiny_sae_root):
    """A data root with the tiny model, SAE and prompts provisioned (copies, so a case may damage them)."""
    layout = DataLayout(tmp_path / "data")
    shutil.copytree(tiny_model_dir, layout.model_dir("tiny"))
    shutil.copytree(tiny_sae_root, layout.sae_dir("tiny-sae"))
    prompts = layout.prompts_dir("tiny-prompts") / "prompts.jsonl"
    prompts.parent.mkdir(parents=True)
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_PROMPTS[:2]), encoding="utf-8")
    return layout, prompts


def _project(**variant_changes) -> ProjectConfig:
    raw = json.loads(json.dumps(PROJECT))
    for variant, changes in variant_changes.items():
        raw["variants"][variant].update(changes)
    return ProjectConfig.model_validate(raw)


def _damage(case: str, layout: DataLayout, prompts: Path) -> None:
    model = layout.model_dir("tiny")
    sae = layout.sae_dir("tiny-sae") / f"unet.{TINY_TARGET_LAYER}"
    if case == "prompt file missing":
        prompts.unlink()
    elif case == "prompt file empty":
        prompts.write_text("")
    elif case == "prompt file not UTF-8":
        prompts.write_bytes(b'{"text": "a caf\xe9"}\n')
    elif case == "no valid prompt line":
        prompts.write_text('{"text": \n{"prompt": "a cat"}\n', encoding="utf-8")
    elif case == "model component missing":
        shutil.rmtree(model / "vae")
    elif case == "truncated safetensors":
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "SAE d_in mismatch":
        shutil.rmtree(sae)
        build_tiny_sae(layout.sae_dir("tiny-sae"), d_in=32)
    elif case == "SAE cfg.json missing fields":
        (sae / "cfg.json").write_text(json.dumps({"normalize_decoder": True}))


BAD_INPUTS = [
    ("prompt file missing", {}, PromptFileError, "does not exist; provision the prompt dataset first"),
    ("prompt file empty", {}, PromptFileError, "is empty"),
    ("prompt file not UTF-8", {}, PromptFileError, "is not UTF-8.*re-save the file as UTF-8"),
    ("no valid prompt line", {}, PromptFileError, "no valid prompt line: invalid JSON.*no 'text' field"),
    ("model component missing", {}, ModelFolderError, "missing the component folder 'vae'.*Re-provision"),
    ("truncated safetensors", {}, ModelFolderError, "diffusion_pytorch_model.safetensors.*truncated"),
    ("wrong layer name", {"tiny-raw": {"layer": "up_blocks.1.attention.1"},
                          "tiny-sae": {"layer": "up_blocks.1.attention.1"}},
     LayerNotFoundError, "up_blocks.1.attentions.1"),
    ("SAE d_in mismatch", {}, SaeFormatError, "d_in=32 but the hooked layer has width 64"),
    ("SAE cfg.json missing fields", {}, SaeFormatError, "missing required field"),
    ("declared width wrong", {"tiny-raw": {"width": 65}}, ValueError, r"variants.tiny-raw.width.*set `width: 64`"),
]


@pytest.mark.parametrize(("case", "changes", "error", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_before_generation_and_writes_nothing(stage, case, changes, error, message):
    layout, prompts = stage
    _damage(case, layout, prompts)
    with pytest.raises(error, match=message):
        capture_group(_project(**changes), layout, "tiny", CaptureConfig(**CAPTURE), device=_cpu())
    assert not layout.outputs_dir.exists(), f"{case}: something was written under {layout.outputs_dir}"


def _cpu():
    import torch

    return torch.device("cpu")


def test_wrong_layer_in_run_capture_writes_nothing(tiny_pipe, capture_root, tmp_path):
    with pytest.raises(LayerNotFoundError, match="up_blocks.1.attentions.1"):
        run_capture(tiny_pipe, "up_blocks.1.attention.1", {"raw": RawChannels(None).reduce}, TINY_PROMPTS[:2],
                    capture_root, tmp_path, CaptureConfig(**CAPTURE))
    assert not capture_root.exists()


def test_invalid_lines_and_long_prompts_are_counted_and_warned(stage):
    layout, prompts = stage
    long_prompt = " ".join([TINY_PROMPTS[0]] * 40)
    prompts.write_text(json.dumps({"text": long_prompt}) + "\nnot json\n" + json.dumps({"text": TINY_PROMPTS[1]})
                       + "\n", encoding="utf-8")
    messages: list[str] = []
    result = capture_group(_project(), layout, "tiny", CaptureConfig(**CAPTURE), device=_cpu(),
                           log=messages.append)
    assert result.summary["complete"] and result.summary["generations"] == 2
    text = "\n".join(messages)
    assert "1 invalid line(s) skipped" in text and "line" in text
    assert "1 of 2 prompt is longer than" in text and "will be truncated" in text


def test_top_k_larger_than_width_writes_nothing(tmp_path):
    store = synthetic_store(tmp_path / "capture", width=6)
    out = tmp_path / "stats" / "raw"
    with pytest.raises(ValueError, match="top_k=7 exceeds the width 6.*set top_k to at most 6"):
        compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=7))
    assert not out.parent.exists()


# ---- full disk --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_disk_full_during_a_capture_batch_keeps_finished_batches(tiny_pipe, capture_root, tmp_path, monkeypatch):
    prompts = TINY_PROMPTS[:3]
    first = run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, prompts, capture_root, tmp_path,
                        CaptureConfig(**CAPTURE), stop_after_batches=1)
    assert first.batches_done == [0]
    good = next(ActivationStore(capture_root).iter_dense("raw"))[2].copy()
    faulty = FaultyOs(fail_on=3)  # the third file of batch 1 (image, dense, then its top-k table)
    monkeypatch.setattr(atomic, "os", faulty)
    with pytest.raises(OSError) as error:
        run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, prompts, capture_root, tmp_path,
                    CaptureConfig(**CAPTURE))
    assert error.value.errno == errno.ENOSPC
    assert "No space left on device" in str(error.value) and "batch_00001" in str(error.value)
    monkeypatch.undo()
    store = ActivationStore(capture_root)
    assert store.finished_batches() == {0}  # batch 1 is not half-counted
    np.testing.assert_array_equal(next(store.iter_dense("raw"))[2], good)  # batch 0 still loads
    assert not list(capture_root.rglob("*.tmp-*"))
    again = run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, prompts, capture_root, tmp_path,
                        CaptureConfig(**CAPTURE))
    assert again.summary["complete"] and again.batches_done == [1, 2]


def test_disk_full_at_any_write_of_timestep_stats_keeps_a_consistent_readable_folder(tmp_path, monkeypatch):
    """ENOSPC at every single file replacement in turn: the old statistics (top_k=2) stay readable
    and consistent, or, past the final swap, the new ones (top_k=3) are; never a mix, never leftovers."""
    store = synthetic_store(tmp_path / "capture")
    out = tmp_path / "stats" / "raw"
    compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=2))
    compute_timestep_stats(store, "raw", tmp_path / "count" / "raw", TimestepStatsConfig(top_k=2))
    counter = FaultyOs(fail_on=None)  # counted over an existing folder, as below (its swap is one exchange)
    monkeypatch.setattr(atomic, "os", counter)
    compute_timestep_stats(store, "raw", tmp_path / "count" / "raw", TimestepStatsConfig(top_k=3))
    total = counter.replace_calls
    assert total > 8
    outcomes = set()
    for fail_on in range(1, total + 1):
        monkeypatch.setattr(atomic, "os", FaultyOs(fail_on))
        with pytest.raises(OSError) as error:
            compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=3))
        assert error.value.errno == errno.ENOSPC and "No space left on device" in str(error.value)
        monkeypatch.setattr(atomic, "os", os)
        top_k = read_summary(out)["config"]["top_k"]
        con = connect_stats(out)
        rows = con.execute("select count(*) from topk").fetchone()[0]
        con.close()
        assert rows == 6 * 3 * top_k, (fail_on, top_k, rows)
        assert not [p for p in out.parent.iterdir() if atomic.is_temp_name(p.name)], fail_on
        outcomes.add(top_k)
        if top_k == 3:  # the failure came after the swap: put the old folder back for the next case
            compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=2))
    assert 2 in outcomes


# ---- Dagster: unknown partition key, downstream before upstream -------------------------------------

def test_unknown_partition_key_is_an_understandable_dagster_error(tmp_path):
    import dagster as dg
    from dagster._core.errors import DagsterUnknownPartitionError

    from tests.test_assets import _materialize

    with pytest.raises(DagsterUnknownPartitionError, match="Could not find a partition with key `no-such-variant`"):
        _materialize("timestep_stats", "no-such-variant", tmp_path, dg.DagsterInstance.ephemeral())


@pytest.mark.parametrize(("asset", "key", "needed"), [
    ("activations", "tiny", "materialize models[tiny], saes[tiny-sae], prompt_datasets[tiny-prompts] first"),
    ("activity_plots", "tiny-raw:0-15",
     "materialize models[tiny], saes[tiny-sae], prompt_datasets[tiny-prompts], activations[tiny], "
     "timestep_stats[tiny-raw] first"),
])
def test_downstream_before_upstream_names_what_to_materialize(tmp_path, asset, key, needed):
    import dagster as dg

    from tests.test_assets import _error, _materialize

    result = _materialize(asset, key, tmp_path, dg.DagsterInstance.ephemeral())
    assert not result.success and needed in _error(result)
    assert not (tmp_path / "outputs" / "default" / asset).exists()


# ---- non-finite activations ---------------------------------------------------------------------------

def _rows(ids):
    return [{"generation_id": g, "prompt_index": g, "prompt": f"p{g}", "image_index": 0, "seed": g,
             "image_path": f"images/{g}.png"} for g in ids]


def test_non_finite_activations_are_refused_naming_channels_generations_and_timesteps(tmp_path):
    from ddr_core.activation_store import NonFiniteActivationsError

    store = ActivationStore(tmp_path / "capture")
    values = np.zeros((3, 3, 6), dtype=np.float32)
    values[1, 1, 3] = np.nan  # generation 11, timestep 500, channel 3
    values[2, 0, 5] = np.inf  # generation 12, timestep 900, channel 5
    with pytest.raises(NonFiniteActivationsError) as error:
        store.write_batch(0, _rows([10, 11, 12]), [900, 500, 100], {"raw": VariantBatch(values)})
    message = str(error.value)
    assert "variant 'raw', conditional half: 2 non-finite activation(s) (NaN 1, +inf 1) in 2 channel(s)" in message
    assert "[per channel 3: 1, 5: 1]" in message and "generations [11, 12]" in message
    assert "timesteps [900, 500]" in message and "check the SAE's weights" in message
    assert not [p for p in store.root.rglob("*") if p.is_file()]  # nothing of the batch was written
    big = np.zeros((3, 3, 6), dtype=np.float32)
    big[0, 2, 1] = 1e6  # finite, but beyond float16
    with pytest.raises(NonFiniteActivationsError, match=r"exceed the float16 range \(largest magnitude 1e\+06\)"):
        store.write_batch(0, _rows([10, 11, 12]), [900, 500, 100], {"raw": VariantBatch(big)})


def test_capture_with_a_nan_feature_fails_naming_it_and_writes_no_batch(tiny_pipe, tmp_path):
    """An SAE whose weights went NaN for one feature: the capture fails at its first batch naming the
    variant and the feature, instead of recording it as an inactive feature with maximum -inf."""
    from ddr_core.activation_store import NonFiniteActivationsError
    from ddr_core.activations import CaptureConfig, run_capture
    from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER

    def broken_sae(tokens):
        features = RawChannels(None).reduce(tokens)
        features[:, 7] = float("nan")
        return features

    root = tmp_path / "capture"
    with pytest.raises(NonFiniteActivationsError, match=r"variant 'broken', conditional half: .* in 1 channel\(s\) "
                                                        r"\[per channel 7: "):
        run_capture(tiny_pipe, TINY_TARGET_LAYER, {"broken": broken_sae}, list(TINY_PROMPTS[:2]), root, tmp_path,
                    CaptureConfig(num_images_per_prompt=1, batch_size=2, num_inference_steps=3, seed=1))
    assert not ActivationStore(root).finished_batches() and not list(root.glob("broken/batches/*"))


def test_statistics_of_a_store_with_inf_name_the_channel(tmp_path, monkeypatch):
    """A store written before capture checked values: timestep_stats names the channel instead of failing on
    'Out of range float values are not JSON compliant: inf'."""
    from ddr_core import activation_store
    from ddr_core.activation_store import NonFiniteActivationsError

    store = ActivationStore(tmp_path / "capture")
    values = np.ones((3, 3, 6), dtype=np.float32)
    values[0, 2, 4] = np.inf
    monkeypatch.setattr(activation_store, "check_finite", lambda *args, **kwargs: None)
    store.write_batch(0, _rows([0, 1, 2]), [900, 500, 100], {"raw": VariantBatch(values)})
    store.finalize()
    monkeypatch.undo()
    with pytest.raises(NonFiniteActivationsError, match=r"\[per channel 4: 1\], generations \[0\], timesteps \[100\]"):
        compute_timestep_stats(store, "raw", tmp_path / "stats" / "raw", TimestepStatsConfig(top_k=2))
    assert not (tmp_path / "stats" / "raw").exists()


# ---- symbolic links: a linked data root or outputs/ works; a linked stage folder is refused ----------


def _tree(*roots: Path) -> dict[str, int]:
    """Every file and link under ``roots`` (not following links) with its size: what was written."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or path.is_file():
                found[str(path)] = path.lstat().st_size
    return found


@pytest.mark.parametrize("linked", ["data root", "outputs/"])
def test_symlinked_data_root_or_outputs_folder_works_end_to_end(stage, tmp_path, linked):
    """The data root reached through a link, or its ``outputs/`` linked to another disk (a cluster's scratch):
    capture (several batches), timestep statistics, shards and the HTML export all work, stored paths are
    relative to the data root (``outputs/...``), the files lie on the link's target, and a crafted path
    still cannot leave the data root through the link."""
    from ddr_core.html_export import write_html_report
    from ddr_core.representation import ShardFileError, build_index, build_shards, resolve_file

    real_layout, _ = stage
    scratch = tmp_path / "scratch"
    if linked == "data root":
        (tmp_path / "home-link").symlink_to(real_layout.data_root)
        data_root = tmp_path / "home-link"
    else:
        (scratch / "outputs").mkdir(parents=True)
        (real_layout.data_root / "outputs").symlink_to(scratch / "outputs")
        data_root = real_layout.data_root
    layout = DataLayout(data_root)
    capture = capture_group(_project(), layout, "tiny", CaptureConfig(**CAPTURE), device=_cpu())
    assert capture.batches_done == [0, 1] and capture.summary["complete"]
    store = ActivationStore(layout.activations_dir("tiny"))
    image_paths = store.read_generations()["image_path"].to_list()
    assert all(p.startswith("outputs/default/activations/tiny/images/") for p in image_paths), image_paths
    assert all(resolve_file(layout.data_root, p).is_file() for p in image_paths)
    if linked == "outputs/":
        assert (scratch / "outputs" / "default" / "activations" / "tiny" / "images").is_dir()  # on the target
    compute_timestep_stats(store, "tiny-raw", layout.timestep_stats_dir("tiny-raw"), TimestepStatsConfig(top_k=2))
    summary = build_shards(layout, "tiny-raw", range(8))
    assert not summary.errors
    build_index(layout, "tiny-raw")
    report = write_html_report(layout, "tiny-raw", layout.stage_dir("html_export", "tiny-raw"))
    assert report.problems == [] and report.channels
    assert layout.relative(report.index) == "outputs/default/html_export/tiny-raw/index.html"
    assert "<img" in report.index.read_text()
    for crafted in ("outputs/../../etc/passwd", "outputs/default/../../../../../etc/passwd", "/etc/passwd"):
        with pytest.raises(ShardFileError, match="escapes the data root"):
            resolve_file(layout.data_root, crafted)


@pytest.mark.parametrize("where", ["capture folder", "experiment folder", "statistics folder",
                                   "representation folder", "priors channel folder"])
def test_symlinked_stage_folder_is_refused_naming_the_link_with_nothing_written(tiny_pipe, tmp_path, where):
    """A stage, experiment or channel folder inside ``outputs/`` that is a link (here: out of the data root) is
    refused at the start of the stage, before any model work, naming the link and the fix; nothing is written,
    neither in the data root nor at the link's target, and the link is left as it was."""
    from ddr_core.priors import PriorsConfig, run_priors
    from ddr_core.representation import build_shards
    from tests.representation_data import VARIANT, make_toy_data_root

    toy = make_toy_data_root(tmp_path / "data", priors=False, dreams=False)
    layout = toy.layout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = {"capture folder": layout.activations_dir("tiny2"), "experiment folder": layout.outputs_dir,
            "statistics folder": layout.timestep_stats_dir("tiny-raw"),
            "representation folder": layout.stage_dir("representation", VARIANT),
            "priors channel folder": layout.stage_dir("priors", VARIANT) / "channel_00000"}[where]
    if where == "experiment folder":
        shutil.move(layout.outputs_dir, elsewhere / "default")
        elsewhere = elsewhere / "default"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    before = _tree(layout.data_root, elsewhere)

    with pytest.raises(UnsafePathError) as error:
        if where in ("capture folder", "experiment folder"):
            run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, TINY_PROMPTS[:2],
                        layout.activations_dir("tiny2"), layout.data_root, CaptureConfig(**CAPTURE))
        elif where == "statistics folder":
            compute_timestep_stats(synthetic_store(tmp_path / "store"), "raw", link, TimestepStatsConfig(top_k=2))
        elif where == "representation folder":
            build_shards(layout, VARIANT, [0])
        else:
            run_priors(tiny_pipe, None, TINY_TARGET_LAYER, layout.timestep_stats_dir(VARIANT), [0],
                       layout.stage_dir("priors", VARIANT), PriorsConfig(), layout.data_root)
    message = str(error.value)
    assert f"symbolic link {link} -> {elsewhere}" in message, message
    assert "Replace the link by a real folder" in message and "link the whole data root" in message
    assert _tree(layout.data_root, elsewhere) == before, "something was written"
    assert link.is_symlink()


def test_disk_full_at_a_stages_first_write_and_at_its_error_report_names_the_first(stage, tmp_path, monkeypatch):
    """ENOSPC from the stage's first write on (the disk stays full): the job fails with the stage's own error,
    naming the file it could not write; the error report, which cannot be written either, is only mentioned
    (before: the failure to write the report was what was raised)."""
    from ddr_core.cluster_payload import StageFailed, StageRequest, error_path, report_path, run_stage

    layout, _ = stage
    config = tmp_path / "project.yaml"
    config.write_text(json.dumps(PROJECT))
    request = StageRequest(stage="capture_group", args={"group": "tiny", "config": CAPTURE},
                           data_root=str(layout.data_root), experiment="default", config_path=str(config),
                           device="cpu", invocation_id="full-disk")
    monkeypatch.setattr(atomic, "os", FaultyOs(fail_on=1, and_after=True))
    logged: list[str] = []
    with pytest.raises(StageFailed) as failure:
        run_stage(request, log=logged.append)
    message = str(failure.value)
    first = message.split(" [the error report ")[0]
    capture = layout.activations_dir("tiny")
    assert f"OSError: [Errno 28] could not write file {capture}/" in first, message
    assert "No space left on device" in first
    errors = error_path(layout.data_root, "default", "full-disk")
    assert f"[the error report {errors} could not be written either (OSError: [Errno 28]" in message
    assert any(f"could not write file {capture}/" in line for line in logged)  # logged before the report try
    assert isinstance(failure.value.__cause__, OSError) and failure.value.__cause__.errno == errno.ENOSPC
    assert not errors.exists() and not report_path(layout.data_root, "default", "full-disk").exists()
