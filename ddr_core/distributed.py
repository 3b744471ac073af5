"""Several processes inside one job: one rank per GPU, started by ``torchrun`` or ``srun``.

A stage job (:mod:`ddr_core.cluster_payload`) can use every GPU of a node (or of several nodes):
each process is one *rank* of ``world_size``, runs its share of the stage on its own device, and rank
0 assembles what the ranks did into the one completion report. The split (see
:mod:`ddr_core.cluster_payload`) never changes a result: capture batches are seeded per generation
and dream / prior elements per element, so a rank computes exactly what the single process would.

Launchers (both set the environment this module reads; nothing else is needed):

- ``torchrun --standalone --nproc_per_node=N -m ddr_core.cluster_payload request.json`` (one node;
  :func:`launch` runs exactly this, which is what ``StageRequest.processes > 1`` does), sets
  ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and ``MASTER_ADDR`` / ``MASTER_PORT``;
- ``srun --ntasks-per-node=N python -m ddr_core.cluster_payload request.json`` sets
  ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID``. Without ``MASTER_ADDR`` /
  ``MASTER_PORT`` the ranks meet through a rendezvous file on the shared data root.

Only ``SLURM_STEP_NUM_TASKS`` (set by ``srun`` for its step) counts as a world size, never
``SLURM_NTASKS``: a batch script of a multi-task allocation runs as one process with
``SLURM_NTASKS > 1``, and reading that as a world size would make it wait for ranks that never come.

The process group uses ``gloo`` on CPU and ``cpu:gloo,cuda:nccl`` on CUDA when every rank of the node has its
own GPU, else ``gloo`` (several ranks on one GPU: NCCL refuses them; :func:`backend_for`). The ranks never exchange
tensors of the model: they only meet to exchange small JSON status messages (over ``gloo``, CPU
tensors of UTF-8 bytes; no pickle), so ``nccl`` is there for GPU collectives but not used by the
stages today. Imports no Dagster.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:  # torch is imported where it is used: reading the rank environment needs none
    import torch

    from ddr_core.stage_request import StageRequest

LogFn = Callable[[str], None]
T = TypeVar("T")
DEFAULT_TIMEOUT_S = 24 * 3600.0
TIMEOUT_ENV = "DDR_DISTRIBUTED_TIMEOUT_S"
_TAIL_LINES = 200


class DistributedSetupError(RuntimeError):
    """The rank environment or the device of a rank is not usable; the message names the fix."""


@dataclass(frozen=True)
class RankInfo:
    """Which process of a multi-process job this is.

    Attributes:
        rank: ``0 .. world_size - 1``; rank 0 writes the completion report.
        world_size: number of processes of the job (1: not distributed).
        local_rank: index of the process on its node (picks its GPU).
        launcher: ``torchrun``, ``srun`` or ``none``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: Literal["none", "torchrun", "srun"] = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RankInfo:
        """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun), else ``SLURM_PROCID`` /
        ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID`` (srun), else a single process.

        Raises:
            DistributedSetupError: a variable is not an integer or the rank is outside the world.
        """
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" in env:
            names, launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun"
        elif "SLURM_STEP_NUM_TASKS" in env:
            names, launcher = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"), "srun"
        else:
            return cls()
        values = []
        for name, default in zip(names, ("0", None, "0"), strict=True):
            text = env.get(name, default)
            try:
                values.append(int(text))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DistributedSetupError(
                    f"environment variable {name}={text!r} is not an integer; start the job with torchrun or "
                    f"srun (which set {', '.join(names)}), or unset {names[1]} to run as one process"
                ) from None
        rank, world_size, local_rank = values
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise DistributedSetupError(
                f"{names[0]}={rank} is not a rank of {names[1]}={world_size} (or {names[2]}={local_rank} < 0); "
                f"start the job with torchrun or srun instead of setting these variables by hand"
            )
        return cls(rank, world_size, local_rank, launcher if world_size > 1 else "none")


def device_for_rank(requested: str, info: RankInfo) -> torch.device:
    """The device of one rank: ``cuda:<local_rank>`` for ``auto`` / ``cuda`` when CUDA is there.

    ``auto`` without CUDA gives ``cpu``. When each process sees exactly one GPU (``srun
    --gpus-per-task=1`` sets ``CUDA_VISIBLE_DEVICES`` per task) it is ``cuda:0``.

    Raises:
        DistributedSetupError: ``cuda:N`` with several ranks (every rank would share one GPU), or more
            ranks on the node than visible GPUs.
    """
    import torch

    name = requested.strip().lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name.startswith("cuda:") and info.distributed:
        raise DistributedSetupError(
            f"device {requested!r} would put all {info.world_size} ranks on one GPU; use device 'cuda' (or "
            f"'auto') so that each rank takes cuda:<local rank>, or restrict the visible GPUs with "
            f"CUDA_VISIBLE_DEVICES"
        )
    if name not in ("auto", "cuda"):
        return torch.device(requested)
    count = torch.cuda.device_count()
    if not info.distributed or count == 0:
        return torch.device("cuda")  # as in one process (no CUDA: fails where the stage first uses it)
    if count == 1:
        return torch.device("cuda:0")
    if info.local_rank >= count:
        raise DistributedSetupError(
            f"{info} has local rank {info.local_rank} but this node shows {count} GPU(s); start at most "
            f"{count} processes per node (torchrun --nproc_per_node, srun --ntasks-per-node)"
        )
    return torch.device(f"cuda:{info.local_rank}")


def local_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun), else the most tasks of any node of the srun step
    (``SLURM_STEP_TASKS_PER_NODE``, e.g. ``2(x3),1``); ``None`` when neither is set or readable."""
    env = os.environ if environ is None else environ
    text = env.get("LOCAL_WORLD_SIZE")
    if text is not None:
        return int(text) if text.strip().isdigit() else None
    text = env.get("SLURM_STEP_TASKS_PER_NODE")
    counts = re.findall(r"(\d+)(?:\(x\d+\))?", text or "")
    return max(int(c) for c in counts) if counts else None


def backend_for(device: torch.device, info: RankInfo | None = None, environ: Mapping[str, str] | None = None,
                device_count: int | None = None) -> str:
    """The process-group backend of a rank on ``device``.

    ``gloo`` for CPU ranks. For CUDA ranks ``cpu:gloo,cuda:nccl`` (CPU tensors go through gloo) only when each
    rank of the node provably has a GPU of its own: the node's ranks (:func:`local_world_size`) are no more
    than the GPUs this process sees (``device_count``; default ``torch.cuda.device_count()``). Otherwise (two
    ranks on one GPU, e.g. ``processes: 2`` on a one-GPU machine, or an unknown number of ranks per node)
    plain ``gloo``: NCCL refuses two ranks on one device, and the stages only exchange small CPU messages
    (:func:`all_gather_json`), which gloo carries. One process (``world_size`` 1) forms no group at all.
    """
    if device.type != "cuda":
        return "gloo"
    if info is None or not info.distributed:
        return "cpu:gloo,cuda:nccl"
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    ranks_here = local_world_size(environ)
    if ranks_here is None or ranks_here > device_count:
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def timeout_seconds() -> float:
    """How long a rank waits for the others at a meeting point (``DDR_DISTRIBUTED_TIMEOUT_S``, default
    24 h: a rank that finished its share waits there for the slowest one)."""
    text = os.environ.get(TIMEOUT_ENV)
    try:
        return float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedSetupError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None


@contextlib.contextmanager
def process_group(info: RankInfo, device: torch.device, *, rendezvous_file: Path | None = None,
                  timeout_s: float | None = None) -> Iterator[None]:
    """Join the job's process group for the ``with`` body; the group is always destroyed after.

    Rendezvous: ``env://`` when ``MASTER_ADDR`` and ``MASTER_PORT`` are set (torchrun sets them),
    otherwise the file ``rendezvous_file`` (a path every rank sees, e.g. on the shared data root;
    it must not exist from an earlier job).

    Raises:
        DistributedSetupError: neither a master address nor a rendezvous file is available.
    """
    import torch
    import torch.distributed as dist

    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        init_method = "env://"
    elif rendezvous_file is not None:
        Path(rendezvous_file).parent.mkdir(parents=True, exist_ok=True)
        init_method = Path(rendezvous_file).resolve().as_uri()
    else:
        raise DistributedSetupError(
            f"{info}: no rendezvous: set MASTER_ADDR and MASTER_PORT (torchrun does), or run under srun with "
            f"the data root on a shared file system"
        )
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device, info), init_method=init_method, rank=info.rank, world_size=info.world_size,
        timeout=_dt.timedelta(seconds=timeout_s if timeout_s is not None else timeout_seconds()),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's ``value`` (JSON-serialisable), in rank order; a meeting point of all ranks.

    Sent as UTF-8 bytes in CPU ``uint8`` tensors (gloo), so nothing is pickled.
    """
    import torch
    import torch.distributed as dist

    data = json.dumps(value).encode("utf-8")
    world = dist.get_world_size()
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(buffers, padded)
    return [json.loads(buffer[: int(s.item())].numpy().tobytes().decode("utf-8"))
            for buffer, s in zip(buffers, sizes, strict=True)]


def barrier() -> None:
    """Wait until every rank arrives (a gather over gloo, so it never needs a CUDA device)."""
    all_gather_json(None)


def split_round_robin(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The share of ``rank``: ``items[rank::world_size]``.

    Round-robin over sorted channels keeps the shares balanced also when a killed run had finished a
    prefix of them (each rank then finds about the same number already done).
    """
    return list(items[rank::world_size])


# ------------------------------------------------------------------------------------------- launcher
_RANK_LINE = re.compile(r"^\s*rank\s*:\s*(\d+)", re.MULTILINE)
_EXIT_LINE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE)


def torchrun_command(request_file: Path, processes: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N -m ddr_core.cluster_payload FILE``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "ddr_core.cluster_payload", str(request_file)]


def launch(request: StageRequest, processes: int | None = None, log: LogFn | None = None) -> dict[str, Any]:
    """Run ``request`` as ``processes`` ranks under torchrun on this node; return the completion report.

    The ranks' output is passed to ``log`` line by line. ``OMP_NUM_THREADS`` defaults to the CPU count
    divided among the ranks.

    Raises:
        StageFailed: a rank raised (the message names it and its error, from the error report rank 0
            wrote) or died without raising (killed, out of memory, segfault: the message names the
            rank and exit code torchrun reported, and this function writes the error report).
    """
    from ddr_core.stage_request import JobReports, StageFailed

    log = log or (lambda message: print(message, flush=True))
    processes = processes or request.processes
    if processes < 2:
        raise ValueError(f"launch needs at least 2 processes, got {processes}; call run_stage for one process")
    reports = JobReports(request, world_size=processes)
    reports.clear(errors=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with tempfile.TemporaryDirectory(prefix="ddr-launch-") as folder:
        request_file = Path(folder) / "request.json"
        request_file.write_text(request.model_copy(update={"processes": processes}).model_dump_json(),
                                encoding="utf-8")
        process = subprocess.Popen(torchrun_command(request_file, processes), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line.rstrip("\n"))
                log(line.rstrip("\n"))
            code = process.wait()
        finally:
            if process.poll() is None:  # interrupted: take the ranks down with us
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    what = f"stage {request.stage!r} invocation {request.invocation_id}{reports.where} with {processes} processes"
    report = reports.read_report()
    if code == 0 and report is not None:
        return report
    error = reports.read_error()
    if error and not error.get("lost_contact"):  # a rank raised: rank 0 named it
        raise StageFailed(f"{what} failed: {error.get('error')}")
    text = "\n".join(tail)
    root_cause = text.rpartition("Root Cause")[2]  # torchrun's summary: the first rank that failed
    ranks, codes = _RANK_LINE.findall(root_cause), _EXIT_LINE.findall(root_cause)
    if code == 0:
        message = "torchrun finished but no rank wrote the completion report"
    elif ranks:
        message = (f"rank {ranks[0]} of {processes} died without raising (exit code "
                   f"{codes[0] if codes else '?'}: killed, out of memory or a crash) and torchrun stopped the "
                   f"others")
    else:
        message = f"torchrun exited with code {code} before the ranks reported"
    unwritten = reports.write_error(message, text[-4000:], log=log, failed_ranks=[int(r) for r in ranks[:1]],
                                    **({"rank_0_saw": error.get("error")} if error else {}))
    raise StageFailed(f"{what} failed: {message}{unwritten}; last output:\n{text[-2000:]}")
