"""The stages a job can run: one registry entry per stage, with how it runs, splits across ranks and merges.

A :class:`StageSpec` holds a stage's ``run`` (the ddr_core function behind it, called with a
:class:`~ddr_core.stage_request.StageRequest`), its ``split`` (the part one rank of several runs: capture
shards, or channels dealt round-robin) and its ``merge`` (rank 0 assembles the ranks' results into the one
completion report). :mod:`ddr_core.cluster_payload` runs them, in one process or as ranks; a new stage is
one entry in :data:`STAGES`.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddr_core.stage_request import LogFn, StageRequest


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _context(request: StageRequest):
    from ddr_core.config import load_project_config
    from ddr_core.paths import DataLayout

    project = load_project_config(request.config_path)
    return project, DataLayout(request.data_root, request.experiment)


# ------------------------------------------------------------------------------------------- run
def _stage_selftest(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """Environment facts of the machine running the job; ``args.fail`` raises (tests the failure path).

    Under several ranks, ``args.fail_rank`` raises on that rank only and ``args.exit_rank`` makes that
    rank die without raising (``os._exit(3)``, as a crash or the out-of-memory killer would).
    """
    from ddr_core.distributed import RankInfo

    log(f"selftest on {socket.gethostname()} (python {platform.python_version()})")
    rank = RankInfo.from_env().rank
    if request.args.get("fail") or request.args.get("fail_rank") == rank:
        raise RuntimeError(str(request.args.get("message", "selftest asked to fail")))
    if request.args.get("exit_rank") == rank:
        os._exit(3)
    result: dict[str, Any] = {"host": socket.gethostname(), "python": platform.python_version(),
                              "executable": sys.executable, "echo": request.args.get("echo")}
    if request.args.get("torch", False):
        import torch

        result.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(),
                      device=str(resolve_device(request.device)))
    if request.args.get("units"):
        result["units_done"] = _selftest_units(request, log)
    return result


def _selftest_units(request: StageRequest, log: LogFn) -> list[int]:
    """``args.units`` units of ``args.unit_seconds`` each, like a stage's channels: one file per finished
    unit under ``<data root>/selftest_units/`` (written whole), finished ones skipped, progress counted
    (so a requested stop takes effect between units). Returns the units this call did."""
    import time

    from ddr_core.atomic import atomic_path
    from ddr_core.progress import Progress

    folder = Path(request.data_root) / "selftest_units"
    folder.mkdir(parents=True, exist_ok=True)
    units = int(request.args["units"])
    todo = [i for i in range(units) if not (folder / f"unit_{i:04d}").exists()]
    done = []
    with Progress(units, "selftest", log=log, unit="unit", initial=units - len(todo)) as progress:
        for index in todo:
            time.sleep(float(request.args.get("unit_seconds", 0.0)))
            with atomic_path(folder / f"unit_{index:04d}") as tmp:
                tmp.write_text(str(index), encoding="utf-8")
            done.append(index)
            progress.update()
    return done


def _stage_capture_group(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.activations.capture_group``; args: ``group``, ``config`` (CaptureConfig fields),
    optional ``stop_after_batches``, ``performance`` (:class:`~ddr_core.performance.PerformanceConfig` fields)."""
    from ddr_core.activations import CaptureConfig, capture_group

    project, layout = _context(request)
    config = CaptureConfig.model_validate(request.args.get("config", {}))
    result = capture_group(project, layout, request.args["group"], config, resolve_device(request.device),
                           log=log, stop_after_batches=request.args.get("stop_after_batches"),
                           lock_owner=request.lock_owner, performance=request.args.get("performance"))
    return {"root": layout.relative(result.root), "batches_done": result.batches_done,
            "batches_skipped": result.batches_skipped, "seconds": result.seconds, "images": result.images,
            "seconds_per_image": result.seconds_per_image, "summary": result.summary}


def _stage_priors_for_variant(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.priors.priors_for_variant``; args: ``variant``, ``channels`` (list or null), ``config``."""
    from ddr_core.priors import PriorsConfig, priors_for_variant

    project, layout = _context(request)
    config = PriorsConfig.model_validate(request.args.get("config", {}))
    result = priors_for_variant(project, layout, request.args["variant"], request.args.get("channels"), config,
                                resolve_device(request.device), log=log,
                                stop_after_channels=request.args.get("stop_after_channels"),
                                lock_owner=request.lock_owner)
    return {"out_dir": layout.relative(result.out_dir), "done": result.done, "skipped": result.skipped,
            "resumed": result.resumed, "seconds": result.seconds, "images": result.images}


def _stage_dreams_for_variant(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.dreams.dreams_for_variant``; args: ``variant``, ``channels``, ``config``, ``stage``
    (``dreams`` / ``dreams_no_noise``), optional ``performance`` (PerformanceConfig fields). The quality table stays on disk (``quality_path``)."""
    from ddr_core.dreams import DreamConfig, dreams_for_variant

    project, layout = _context(request)
    config = DreamConfig.model_validate(request.args.get("config", {}))
    result = dreams_for_variant(project, layout, request.args["variant"], request.args.get("channels"), config,
                                resolve_device(request.device), log=log,
                                stop_after_channels=request.args.get("stop_after_channels"),
                                stage=request.args.get("stage", "dreams"), lock_owner=request.lock_owner,
                                performance=request.args.get("performance"))
    return {"out_dir": layout.relative(result.out_dir), "channels_done": result.channels_done,
            "channels_skipped": result.channels_skipped,
            "channels_without_timesteps": result.channels_without_timesteps, "elements": result.elements,
            "element_steps": result.element_steps, "failures": result.failures, "seconds": result.seconds,
            "skipped_timesteps": [{"channel": int(channel), **item}
                                  for channel, items in sorted(result.skipped_timesteps.items()) for item in items],
            "quality_path": layout.relative(result.quality_path) if result.quality_path else None}


def _stage_heatmaps_for_variant(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.heatmaps.heatmaps_for_variant``; args: ``variant``, ``channels``, ``config``, ``inputs`` (what
    the channels are drawn from: upstream data versions, code version; a channel stamped with the same is kept)."""
    from ddr_core.heatmaps import HeatmapConfig, heatmaps_for_variant

    project, layout = _context(request)
    config = HeatmapConfig.model_validate(request.args.get("config", {}))
    result = heatmaps_for_variant(project, layout, request.args["variant"], request.args.get("channels"), config,
                                  resolve_device(request.device), log=log, inputs=request.args.get("inputs"))
    return {"out_dir": layout.relative(result.out_dir), "channels_done": result.channels_done,
            "channels_resumed": result.channels_resumed,
            "channels_without_examples": result.channels_without_examples, "examples": result.examples,
            "seconds": result.seconds, "summary": result.summary,
            "table_path": layout.relative(result.table_path) if result.table_path else None}


def _stage_dose_response_for_variant(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.dose_response.dose_response_for_variant``; args: ``variant``, ``channels``, ``config``, ``inputs``
    (upstream data versions and code version: a channel made from the same is kept)."""
    from ddr_core.dose_response import DoseResponseConfig, dose_response_for_variant

    project, layout = _context(request)
    config = DoseResponseConfig.model_validate(request.args.get("config", {}))
    result = dose_response_for_variant(project, layout, request.args["variant"], request.args.get("channels"), config,
                                       resolve_device(request.device), log=log, inputs=request.args.get("inputs"))
    return {"out_dir": layout.relative(result.out_dir), "done": result.done, "resumed": result.resumed,
            "skipped": {str(k): v for k, v in result.skipped.items()}, "seconds": result.seconds,
            "images": result.images, "config_hash": result.config_hash}


# ------------------------------------------------------------------------------------------- split
def _stage_timestep_stats_shard(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.statistics_shards.compute_stats_shard``; args: ``variant``, ``channels`` ([first, stop)),
    ``config`` (TimestepStatsConfig fields). CPU work: one process (no ranks)."""
    from ddr_core.activation_store import ActivationStore
    from ddr_core.statistics import TimestepStatsConfig
    from ddr_core.statistics_shards import compute_stats_shard

    project, layout = _context(request)
    variant = request.args["variant"]
    group = project.capture_of(variant)
    first, stop = (int(c) for c in request.args["channels"])
    shards_dir = layout.check_output_folder(layout.timestep_stats_dir(variant).with_name(f".{variant}.shards"),
                                            "statistics shards folder")
    info = compute_stats_shard(ActivationStore(layout.activations_dir(group)), variant, (first, stop),
                               TimestepStatsConfig.model_validate(request.args.get("config", {})), shards_dir,
                               log=log)
    return {"shard": info, "shards_dir": layout.relative(shards_dir)}


def _all_channels(request: StageRequest) -> list[int]:
    """The requested channels of a per-channel stage, checked against the variant's width and sorted."""
    from ddr_core.variant_inputs import check_channels, variant_spec

    project, _ = _context(request)
    variant = request.args["variant"]
    width = variant_spec(project, variant).width
    channels = request.args.get("channels")
    if channels is None:
        return list(range(width))
    return sorted(check_channels(channels, width, f"variant {variant!r}"))


def _split_capture(request: StageRequest, rank: int, world_size: int) -> dict[str, Any] | None:
    """Shard ``shard_index + num_shards * rank`` of ``num_shards * world_size`` (batches
    ``b % (num_shards * world_size)``; a job that is itself shard ``i`` of ``n`` keeps ``b % n == i``)."""
    args = dict(request.args)
    config = dict(args.get("config") or {})
    num_shards, shard_index = int(config.get("num_shards", 1)), int(config.get("shard_index", 0))
    config.update(shard_index=shard_index + num_shards * rank, num_shards=num_shards * world_size)
    args["config"] = config
    return args


def _split_channels(request: StageRequest, rank: int, world_size: int) -> dict[str, Any] | None:
    """The sorted channels dealt round-robin (``channels[rank::world_size]``); ``None`` when this rank has none."""
    from ddr_core.distributed import split_round_robin

    channels = _all_channels(request)
    mine = split_round_robin(channels, rank, world_size)
    if channels and not mine:
        return None
    return {**request.args, "channels": mine}


def _split_nothing(request: StageRequest, rank: int, world_size: int) -> dict[str, Any] | None:
    return dict(request.args)


# ------------------------------------------------------------------------------------------- merge
def _union(results: list[dict[str, Any]], key: str) -> list[Any]:
    return sorted({value for result in results for value in result.get(key) or []})


def _merge_capture(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    complete = [r["summary"] for r in results if r["summary"].get("complete")]
    images = sum(r["images"] for r in results)
    seconds = max(r["seconds"] for r in results)
    return {"root": results[0]["root"], "batches_done": _union(results, "batches_done"),
            "batches_skipped": _union(results, "batches_skipped"), "seconds": seconds, "images": images,
            "seconds_per_image": seconds / images if images else float("nan"),
            # the rank that found every batch finished assembled generations.parquet
            "summary": complete[0] if complete else results[0]["summary"]}


def _merge_priors(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    skipped = {k: v for r in results for k, v in (r.get("skipped") or {}).items()}
    return {"out_dir": results[0]["out_dir"], "done": _union(results, "done"),
            "skipped": {k: skipped[k] for k in sorted(skipped, key=int)}, "resumed": _union(results, "resumed"),
            "seconds": max(r["seconds"] for r in results), "images": sum(r["images"] for r in results)}


def _merge_dose_response(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The priors' merge, after pooling every rank's channels once more (a rank summarises only what it saw)."""
    from ddr_core.dose_response import DoseResponseConfig, summarise_dose_response

    _, layout = _context(request)
    config = DoseResponseConfig.model_validate(request.args.get("config", {}))
    summarise_dose_response(layout.data_root / results[0]["out_dir"], layout.data_root, request.args["variant"],
                            seed=config.random_seed, config_hash=results[0].get("config_hash"))
    return _merge_priors(request, results)


def _merge_dreams(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    from ddr_core.dreams import QUALITY_FILE, write_quality_table

    _, layout = _context(request)
    out_dir = layout.data_root / results[0]["out_dir"]
    quality = None
    if any(r.get("quality_path") for r in results):  # rank 0 writes the union once every rank is done
        write_quality_table(out_dir)
        quality = layout.relative(out_dir / QUALITY_FILE)
    failures = sorted((f for r in results for f in r.get("failures") or []),
                      key=lambda f: (f.get("channel", -1), f.get("timestep", -1), f.get("seed", -1)))
    return {"out_dir": results[0]["out_dir"], "channels_done": _union(results, "channels_done"),
            "channels_skipped": _union(results, "channels_skipped"),
            "channels_without_timesteps": _union(results, "channels_without_timesteps"),
            "elements": sum(r["elements"] for r in results),
            "element_steps": sum(r["element_steps"] for r in results), "failures": failures,
            "skipped_timesteps": sorted((s for r in results for s in r.get("skipped_timesteps") or []),
                                        key=lambda s: (s.get("channel", -1), s.get("timestep", -1))),
            "seconds": max(r["seconds"] for r in results), "quality_path": quality}


def _merge_heatmaps(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    from ddr_core.heatmaps import TABLE_FILE, write_union

    _, layout = _context(request)
    out_dir = layout.data_root / results[0]["out_dir"]
    table, summary = write_union(out_dir, request.args.get("inputs") or {})  # rank 0, once every rank is done
    return {"out_dir": results[0]["out_dir"], "channels_done": _union(results, "channels_done"),
            "channels_resumed": _union(results, "channels_resumed"),
            "channels_without_examples": _union(results, "channels_without_examples"),
            "examples": sum(r["examples"] for r in results), "seconds": max(r["seconds"] for r in results),
            "summary": summary, "table_path": layout.relative(out_dir / TABLE_FILE) if table.height else None}


def _merge_selftest(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    return results[0]


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class StageSpec:
    """One stage a job can run (see the module docstring).

    ``run(request, log) -> result``; ``split(request, rank, world_size) -> args`` of that rank's part (``None``:
    nothing to do); ``merge(request, results) -> result`` of the whole job, run on rank 0.
    """

    name: str
    run: Callable[[StageRequest, LogFn], dict[str, Any]]
    split: Callable[[StageRequest, int, int], dict[str, Any] | None]
    merge: Callable[[StageRequest, list[dict[str, Any]]], dict[str, Any]]


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("selftest", _stage_selftest, _split_nothing, _merge_selftest),
    StageSpec("capture_group", _stage_capture_group, _split_capture, _merge_capture),
    StageSpec("priors_for_variant", _stage_priors_for_variant, _split_channels, _merge_priors),
    StageSpec("dreams_for_variant", _stage_dreams_for_variant, _split_channels, _merge_dreams),
    StageSpec("heatmaps_for_variant", _stage_heatmaps_for_variant, _split_channels, _merge_heatmaps),

    StageSpec("dose_response_for_variant", _stage_dose_response_for_variant, _split_channels,
              _merge_dose_response),
    StageSpec("timestep_stats_shard", _stage_timestep_stats_shard, _split_nothing, _merge_selftest),
)}


def stage_spec(name: str) -> StageSpec:
    """The registered stage ``name``.

    Raises:
        ValueError: unknown stage (names the registered ones).
    """
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; registered stages: {sorted(STAGES)}")
    return STAGES[name]


def request_for_rank(request: StageRequest, rank: int, world_size: int, device: str) -> StageRequest | None:
    """The part of ``request`` that one rank runs (its stage's ``split``), or ``None`` when it has nothing to
    do; ``device``: the rank's own device."""
    args = stage_spec(request.stage).split(request, rank, world_size)
    if args is None:
        return None
    owner = f"{request.lock_owner} rank {rank}/{world_size}".strip()
    return request.model_copy(update={"args": args, "device": device, "processes": 1, "lock_owner": owner})
