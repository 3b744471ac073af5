"""Several ranks inside one job: 2 CPU processes (gloo) under the real torchrun give the single-process result.

Capture is compared file by file, bit for bit (tensors of safetensors files, since their header's
metadata order varies between processes; every other file byte by byte); dreams within float
tolerance (a rank batches other elements together than the single process does). CPU kernels round
differently with another thread count, so the ranks and the single process all use one thread. Only
rank 0 writes the completion report, and a rank that raises or dies fails the whole launch with an
error naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from ddr_core.cluster_payload import (
    STAGES,
    StageFailed,
    StageRequest,
    error_path,
    report_path,
    request_for_rank,
    run_stage,
)
from ddr_core.distributed import (
    DistributedSetupError,
    RankInfo,
    backend_for,
    device_for_rank,
    local_world_size,
    split_round_robin,
)
from ddr_core.paths import DataLayout
from ddr_core.tiny_model import TINY_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {
    "models": {"tiny": {"source": {"builtin": "tiny"}}},
    "saes": {"tiny-sae": {"source": {"builtin": "tiny-sae"}}},
    "prompt_datasets": {"tiny-prompts": {"source": {"builtin": "tiny-prompts"}, "file": "prompts.jsonl"}},
    "variants": {"tiny-raw": {"model": "tiny", "prompts": "tiny-prompts", "width": 64, "block_size": 16}},
}
CAPTURE = {"n_prompts": 4, "num_images_per_prompt": 1, "batch_size": 1, "num_inference_steps": 2, "seed": 7}
DREAMS = {"timesteps": [500], "use_prior": False, "n_results": 2, "seeds": [1, 2], "num_steps": 2,
          "snapshot_every": 0, "quality_noise_draws": 1, "batch_size": 4}
LOCK_NAMES = (".lock", ".lock.shard-")  # lock files hold their last owner's pid: not results


def _data_root(base: Path, model_dir: Path) -> Path:
    """A data root with the tiny model, a 4-prompt dataset and a project config (``ddr.yaml``)."""
    layout = DataLayout(base)
    shutil.copytree(model_dir, layout.model_dir("tiny"))
    prompts = layout.prompts_dir("tiny-prompts") / "prompts.jsonl"
    prompts.parent.mkdir(parents=True)
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_PROMPTS[:4]), encoding="utf-8")
    (base / "ddr.yaml").write_text(json.dumps(PROJECT), encoding="utf-8")  # JSON is YAML
    return base


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """Two data roots with the same inputs: one for the single process, one for the 2 ranks."""
    return (_data_root(tmp_path_factory.mktemp("single"), tiny_model_dir),
            _data_root(tmp_path_factory.mktemp("ranks"), tiny_model_dir))


def _request(root: Path, stage: str, args: dict, invocation: str, processes: int = 1) -> StageRequest:
    return StageRequest(stage=stage, args=args, data_root=str(root), experiment="default",
                        config_path=str(root / "ddr.yaml"), device="auto", invocation_id=invocation,
                        processes=processes)


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(LOCK_NAMES)}


def _same_file(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()  # safetensors too: their metadata is one canonical JSON key


@pytest.fixture
def one_thread(monkeypatch):
    """One CPU thread in this process and in the ranks (rounding of CPU kernels depends on it)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reports(root: Path) -> list[str]:
    return sorted(p.name for p in (DataLayout(root).outputs_dir / "_jobs").iterdir())


@pytest.mark.slow  # two processes under torchrun / srun
def test_capture_on_two_ranks_is_bit_identical_to_one_process(roots, one_thread):
    single_root, ranks_root = roots
    single = run_stage(_request(single_root, "capture_group", {"group": "tiny", "config": CAPTURE}, "cap"),
                       log=lambda m: None)
    lines: list[str] = []
    report = run_stage(_request(ranks_root, "capture_group", {"group": "tiny", "config": CAPTURE}, "cap", 2),
                       log=lines.append)

    expected = _files(DataLayout(single_root).activations_dir("tiny"))
    actual = _files(DataLayout(ranks_root).activations_dir("tiny"))
    assert sorted(actual) == sorted(expected) and "generations.parquet" in actual
    different = [name for name in expected if not _same_file(expected[name], actual[name])]
    assert not different, f"files differ from the single-process capture: {different}"

    assert report["world_size"] == 2 and [r["rank"] for r in report["ranks"]] == [0, 1]
    assert [r["result"]["batches_done"] for r in report["ranks"]] == [[0, 2], [1, 3]]  # shard r of 2
    result = report["result"]
    assert result["batches_done"] == single["result"]["batches_done"] == [0, 1, 2, 3]
    assert result["images"] == 4 and result["summary"]["complete"] and result["summary"]["generations"] == 4
    assert result["summary"]["plan"] == single["result"]["summary"]["plan"]
    assert _reports(ranks_root) == ["cap.json"]  # one completion report, written by rank 0
    assert any(line.startswith("[rank 1/2]") for line in lines)


def _dream_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor and numeric table column of a dreams folder, by file and name."""
    arrays: dict[str, np.ndarray] = {}
    for name, path in _files(folder).items():
        if path.suffix == ".safetensors":
            arrays.update({f"{name}:{k}": v.numpy() for k, v in load_file(str(path)).items()})
        elif path.suffix == ".parquet":
            frame = pl.read_parquet(path)
            arrays.update({f"{name}:{c}": frame[c].to_numpy() for c in frame.columns})
    return arrays


@pytest.mark.slow  # two processes under torchrun / srun
def test_dreams_on_two_ranks_equal_one_process(roots, one_thread):
    single_root, ranks_root = roots
    args = {"variant": "tiny-raw", "channels": [5, 0, 9], "config": DREAMS}
    single = run_stage(_request(single_root, "dreams_for_variant", args, "dream"), log=lambda m: None)
    report = run_stage(_request(ranks_root, "dreams_for_variant", args, "dream", 2), log=lambda m: None)

    folder = Path("outputs/default/dreams/tiny-raw")
    expected, actual = _dream_arrays(single_root / folder), _dream_arrays(ranks_root / folder)
    assert sorted(_files(ranks_root / folder)) == sorted(_files(single_root / folder))
    assert sorted(actual) == sorted(expected) and "quality.parquet:dream_activation" in actual
    for key, value in expected.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(actual[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(actual[key], value, err_msg=key)
    for channel in (0, 5, 9):  # dream.json: same timesteps, seeds and paths (activations within tolerance)
        mine, theirs = (json.loads((root / folder / f"channel_{channel:05d}" / "dream.json").read_text())
                        for root in (ranks_root, single_root))
        assert (mine["timesteps"], mine["seeds"], mine["results"].keys()) == \
               (theirs["timesteps"], theirs["seeds"], theirs["results"].keys())

    # channels sorted and dealt round-robin: rank 0 takes 0 and 9, rank 1 takes 5
    assert [r["result"]["channels_done"] for r in report["ranks"]] == [[0, 9], [5]]
    result = report["result"]
    assert result["channels_done"] == sorted(single["result"]["channels_done"]) == [0, 5, 9]
    assert result["elements"] == single["result"]["elements"] == 6
    assert result["quality_path"] == single["result"]["quality_path"]
    assert pl.read_parquet(ranks_root / result["quality_path"])["channel"].to_list() == [0, 0, 5, 5, 9, 9]
    assert _reports(ranks_root) == ["cap.json", "dream.json"]


@pytest.mark.slow  # two processes under torchrun / srun
@pytest.mark.parametrize(("args", "message"), [
    ({"fail_rank": 1, "message": "boom on one rank"}, "rank 1 of 2 .*RuntimeError: boom on one rank"),
    ({"exit_rank": 1}, "rank 1 of 2 died without raising .exit code 3"),
], ids=["raises", "dies"])
def test_a_failing_rank_fails_the_launch_naming_it(tmp_path, args, message):
    run_stage(_request(tmp_path, "selftest", {}, "job"), log=lambda m: None)  # a stale success is removed
    with pytest.raises(StageFailed, match=message):
        run_stage(_request(tmp_path, "selftest", args, "job", 2), log=lambda m: None)
    assert not report_path(tmp_path, "default", "job").exists()
    error = json.loads(error_path(tmp_path, "default", "job").read_text())
    assert error["world_size"] == 2 and error["failed_ranks"] == [1]
    assert ("boom on one rank" in error["traceback_tail"]) == ("fail_rank" in args)


@pytest.mark.slow  # two processes under torchrun / srun
def test_srun_ranks_meet_through_a_rendezvous_file(tmp_path):
    """srun sets SLURM_PROCID / SLURM_STEP_NUM_TASKS and no MASTER_ADDR: the ranks meet on the data root."""
    request = tmp_path / "request.json"
    request.write_text(_request(tmp_path, "selftest", {"echo": "srun"}, "srun").model_dump_json())
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    ranks = [subprocess.Popen([sys.executable, "-m", "ddr_core.cluster_payload", str(request)], cwd=ROOT,
                              env={**env, "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(r),
                                   "SLURM_LOCALID": str(r), "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    report = json.loads(report_path(tmp_path, "default", "srun").read_text())
    assert report["world_size"] == 2 and report["slurm_job_id"] == "4242" and report["result"]["echo"] == "srun"
    assert not list((tmp_path / "outputs" / "default" / "_jobs").glob(".rendezvous-*"))  # cleaned up by torch


def test_rank_environment():
    assert RankInfo.from_env({}) == RankInfo()
    assert RankInfo.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == RankInfo(1, 4, 1, "torchrun")
    srun = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}
    assert RankInfo.from_env(srun) == RankInfo(3, 4, 1, "srun")
    # a batch script of a 4-task allocation is one process: SLURM_NTASKS alone is not a world
    assert not RankInfo.from_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}).distributed
    # torchrun inside an srun step: torchrun's variables win
    assert RankInfo.from_env({**srun, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == RankInfo(0, 2, 0, "torchrun")
    with pytest.raises(DistributedSetupError, match="RANK=5 is not a rank of WORLD_SIZE=2"):
        RankInfo.from_env({"RANK": "5", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE='two' is not an integer"):
        RankInfo.from_env({"WORLD_SIZE": "two"})


def test_rank_devices():
    two = RankInfo(1, 2, 1, "torchrun")
    assert device_for_rank("cpu", two) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert device_for_rank("auto", two) == torch.device("cpu")
    with pytest.raises(DistributedSetupError, match="use device 'cuda'"):
        device_for_rank("cuda:1", two)


def test_process_group_backend_on_one_gpu_is_gloo():
    """Issue #19: NCCL refuses two ranks on one GPU; ranks that may share one use gloo (they only exchange CPU
    messages), ranks with a GPU each may use NCCL for CUDA tensors; CPU ranks always use gloo."""
    cuda, two = torch.device("cuda:0"), RankInfo(1, 2, 1, "torchrun")
    assert backend_for(torch.device("cpu"), two, {"LOCAL_WORLD_SIZE": "2"}, device_count=2) == "gloo"
    # processes: 2 on a one-GPU machine (torchrun): both ranks on cuda:0
    assert backend_for(cuda, two, {"LOCAL_WORLD_SIZE": "2"}, device_count=1) == "gloo"
    # srun with one GPU shown to each task (--gpus-per-task=1): not provably separate GPUs -> gloo
    assert backend_for(cuda, RankInfo(1, 2, 1, "srun"), {"SLURM_STEP_TASKS_PER_NODE": "2"}, device_count=1) == "gloo"
    # nothing says how many ranks share this node: gloo (always safe)
    assert backend_for(cuda, two, {}, device_count=8) == "gloo"
    # a GPU per rank: NCCL for CUDA tensors, gloo for CPU ones
    assert backend_for(cuda, two, {"LOCAL_WORLD_SIZE": "2"}, device_count=2) == "cpu:gloo,cuda:nccl"
    assert backend_for(cuda, RankInfo(3, 4, 1, "srun"), {"SLURM_STEP_TASKS_PER_NODE": "2(x2)"},
                       device_count=2) == "cpu:gloo,cuda:nccl"
    assert backend_for(cuda, RankInfo(), {}, device_count=1) == "cpu:gloo,cuda:nccl"  # one process: no group
    assert local_world_size({"SLURM_STEP_TASKS_PER_NODE": "1,3(x2)"}) == 3
    assert local_world_size({"LOCAL_WORLD_SIZE": "x"}) is None and local_world_size({}) is None


def test_shares_of_the_ranks(roots):
    _, root = roots
    dreams = _request(root, "dreams_for_variant", {"variant": "tiny-raw", "channels": None}, "x")
    shares = [request_for_rank(dreams, r, 3, "cpu").args["channels"] for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(64)) and shares[1][:3] == [1, 4, 7]
    few = _request(root, "priors_for_variant", {"variant": "tiny-raw", "channels": [7]}, "x")
    assert request_for_rank(few, 0, 2, "cpu").args["channels"] == [7]
    assert request_for_rank(few, 1, 2, "cpu") is None  # nothing to do on that rank
    with pytest.raises(IndexError, match="64"):
        request_for_rank(_request(root, "dreams_for_variant", {"variant": "tiny-raw", "channels": [64]}, "x"),
                         0, 2, "cpu")
    capture = _request(root, "capture_group", {"group": "tiny", "config": {"num_shards": 3, "shard_index": 1}}, "x")
    config = request_for_rank(capture, 1, 2, "cuda:1").args["config"]
    assert (config["shard_index"], config["num_shards"]) == (4, 6)  # 4 % 3 == 1: still the job's shard
    assert split_round_robin([0, 1, 2, 3, 4], 1, 2) == [1, 3]


def test_concurrent_ranks_adopt_the_first_random_capture_plan(tmp_path, monkeypatch):
    """Two capture ranks without a seed: the one that loses the race adopts the winner's random seed."""
    from ddr_core import activations
    from ddr_core.activations import PLAN_FILE, CapturePlan, fix_plan

    def plan() -> CapturePlan:
        return CapturePlan(prompts=["a", "b"], num_images_per_prompt=1, batch_size=1, base_seed=-1,
                           num_inference_steps=2, guidance_scale=7.5, height=32, width=32, variants={"raw": {}})

    real_link = os.link

    def other_rank_wins(source, target):  # the other rank links its plan first, then we try ours
        winner = plan()
        winner.base_seed = 12345
        Path(target).write_text(json.dumps(winner.to_json()), encoding="utf-8")
        monkeypatch.setattr(activations.os, "link", real_link)
        return real_link(source, target)

    monkeypatch.setattr(activations.os, "link", other_rank_wins)
    assert fix_plan(tmp_path, plan()).base_seed == 12345
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLAN_FILE]  # no candidate left behind


def test_rank_results_merge_like_one_run(roots):
    _, root = roots
    priors = [{"out_dir": "p", "done": [4, 0], "skipped": {"8": "inactive"}, "resumed": [], "seconds": 2.0, "images": 4},
              {"out_dir": "p", "done": [1], "skipped": {"3": "no_steered_timesteps"}, "resumed": [5], "seconds": 3.0,
               "images": 2}]
    merged = STAGES["priors_for_variant"].merge(_request(root, "priors_for_variant", {}, "x"), priors)
    assert merged == {"out_dir": "p", "done": [0, 1, 4], "skipped": {"3": "no_steered_timesteps", "8": "inactive"},
                      "resumed": [5], "seconds": 3.0, "images": 6}
    capture = [{"root": "r", "batches_done": [2], "batches_skipped": [0], "seconds": 1.0, "images": 1,
                "summary": {"complete": False}},
               {"root": "r", "batches_done": [1, 3], "batches_skipped": [], "seconds": 4.0, "images": 2,
                "summary": {"complete": True, "generations": 4}}]
    merged = STAGES["capture_group"].merge(_request(root, "capture_group", {}, "x"), capture)
    assert merged["batches_done"] == [1, 2, 3] and merged["batches_skipped"] == [0]
    assert merged["summary"] == {"complete": True, "generations": 4}  # from the rank that finalized
    assert (merged["images"], merged["seconds"], merged["seconds_per_image"]) == (3, 4.0, 4.0 / 3)
