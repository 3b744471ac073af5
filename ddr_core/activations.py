"""Capture: generate images for a prompt set and record every variant's activations at every timestep.

One generation pass serves every variant of a capture group (raw channels and each SAE at once).
The work is cut into fixed batches of generations; batch ``b`` holds generation ids
``[b * batch_size, (b + 1) * batch_size)``. A generation's seed depends only on the capture's base
seed and its generation id, so:

- a killed run resumes at the first unfinished batch and gives the same result as an uninterrupted one;
- the batches can be split over several jobs or GPUs (``shard_index`` / ``num_shards``: shard ``i``
  takes the batches with ``b % num_shards == i``) with the same result as one job;
- any generation can be regenerated exactly later from its recorded seed.

The plan (prompts, seeds, sizes) is fixed in ``capture_plan.json`` by the first run; a later run with
different parameters fails with a message instead of mixing two captures in one store.

Locking (:mod:`ddr_core.locks`), so that concurrent runs never interleave their writes:

- ``<root>/.lock.shard-<i>-of-<n>``: held exclusively by the run of shard ``i`` of ``n`` for its whole
  duration. A second run of the *same* shard (for an unsharded capture: a second run of the capture)
  fails at once with :class:`~ddr_core.locks.PartitionLockedError` naming the running one, or waits
  ``lock_wait`` seconds. Runs of *different* shards hold different locks and run side by side.
- ``<root>/.lock``: held *shared* by every running shard while it writes batches. Housekeeping that
  deletes files it does not own needs it *exclusively*: at start, a run that finds no other shard
  running deletes every unfinished leftover (``clean_unfinished``); one that finds others running
  deletes only the leftovers of its own batches. Finalizing (assembling ``generations.parquet``) takes
  it exclusively once every batch is finished, after the other shards are done.
- Concurrent shards must use the same ``num_shards`` (a run with ``num_shards=1`` beside a run with
  ``num_shards=2`` would write the shared batches twice; the results are identical by construction,
  but the work is wasted).
- ``flock`` is released by the kernel when a process dies, so a ``kill -9`` leaves no stale lock.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ddr_core.activation_store import ActivationStore, VariantBatch
from ddr_core.atomic import TEMP_MARKER, atomic_path, is_temp_name
from ddr_core.config import config_hash
from ddr_core.hooks import DEFAULT_DEVICE_BUFFER_BYTES
from ddr_core.lazy_imports import lazy_module
from ddr_core.locks import OwnedFlock, PartitionLockedError, partition_lock
from ddr_core.paths import check_output_folder, relative_to_data_root
from ddr_core.performance import PerformanceConfig, performance_config, tuned_denoiser

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

LogFn = Callable[[str], None]
PLAN_FILE = "capture_plan.json"
GROUP_LOCK_FILE = ".lock"
# Bounds checked when the config is read, before any model is loaded: a 65536-pixel side asks for tens of
# GB before the first step; real models are trained at 512-1024 (SDXL) pixels.
MAX_IMAGE_SIDE = 4096
MAX_INFERENCE_STEPS = 1000
FINALIZE_LOCK_WAIT_S = 600.0
_BATCH_FILE_RE = re.compile(r"^batch_(\d{5,})\.")


def shard_lock_path(root: Path, shard_index: int, num_shards: int) -> Path:
    """The lock file held by the run of one shard of the capture in ``root``."""
    return Path(root) / f".lock.shard-{shard_index}-of-{num_shards}"


def _shard_batches(plan: CapturePlan, config: CaptureConfig) -> set[int]:
    """The batches of ``plan`` that shard ``config.shard_index`` of ``config.num_shards`` writes."""
    return {b for b in range(plan.n_batches) if b % config.num_shards == config.shard_index}


def _remove_unfinished_batch_files(store: ActivationStore, batches: set[int]) -> list[Path]:
    """Delete the files (temporaries included) of the unfinished batches among ``batches``.

    What a killed run of this shard left behind; safe while other shards write *their* batches.
    """
    targets = batches - store.finished_batches()
    removed: list[Path] = []
    if not targets or not store.root.is_dir():
        return removed
    for path in store.root.rglob("*batch_*"):
        name = path.name[1:].split(TEMP_MARKER)[0] if is_temp_name(path.name) else path.name
        match = _BATCH_FILE_RE.match(name)
        if match and int(match.group(1)) in targets and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class CaptureConfig(BaseModel):
    """Parameters of one capture run (validated; errors name the field)."""

    model_config = ConfigDict(extra="forbid")

    n_prompts: int | None = Field(default=None, ge=1, description="only the first N unique prompts")
    num_images_per_prompt: int | None = Field(default=None, ge=1,
                                              description="images per prompt; default 5 on GPU, 1 on CPU")
    batch_size: int = Field(default=4, ge=1, le=1024, description="generations per batch")
    num_inference_steps: int = Field(default=50, ge=1, le=MAX_INFERENCE_STEPS,
                                     description="at most the scheduler's train timesteps (checked on the model)")
    guidance_scale: float = Field(default=7.5, ge=0.0)
    height: int | None = Field(default=None, ge=8, le=MAX_IMAGE_SIDE, description="pixels, a multiple of 8")
    width: int | None = Field(default=None, ge=8, le=MAX_IMAGE_SIDE, description="pixels, a multiple of 8")
    seed: int | None = Field(default=None, ge=0, description="base seed; random (and recorded) when unset")
    keep_unconditional: bool = Field(default=True, description="also store the unconditional CFG half")
    capture_top_k: int = Field(default=64, ge=1, description="channels kept per (generation, timestep) "
                                                             "in the top-k Parquet tables")
    store_summaries: bool = Field(default=True, description="also write the per-batch top-k and max Parquet parts "
                                  "(DuckDB conveniences no stage reads; false saves about a third of the store at "
                                  "batch 4: T x F x 5 / batch_size bytes per generation)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    shard_index: int = Field(default=0, ge=0)
    num_shards: int = Field(default=1, ge=1)
    sae_vectors: bool = Field(default=False, description="also keep the layer's per-position channel vectors "
                                                         "(SAE training data, ddr_core.sae_training)")
    sae_vector_positions_per_call: int | None = Field(default=None, ge=1,
                                                      description="positions kept per image and step; None: all")
    sae_vector_every_n_timesteps: int = Field(default=1, ge=1, description="keep every n-th denoising step")
    host_copies: Literal["per_batch", "per_step"] = Field(
        default="per_batch", description="when the reduced activations go to the CPU: per_batch (kept on the "
        "model's device during a batch's generation, copied once after it) or per_step (copied in the hook at every "
        "step: a host-device sync per step on a GPU; the path before issue #19). Same values either way")
    host_copy_buffer_mib: float = Field(
        default=DEFAULT_DEVICE_BUFFER_BYTES / 2**20, ge=0, description="per_batch keeps at most this many MiB of "
        "reduced activations on the device (a batch needs steps x batch x features x 4 bytes per variant and CFG "
        "half); past it the batch falls back to per-step copies")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the VAE downsamples by 8): use "
                             f"{value // 8 * 8 or 8} or {value // 8 * 8 + 8}")
        return value

    @model_validator(mode="after")
    def _shard_in_range(self) -> CaptureConfig:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index ({self.shard_index}) must be < num_shards ({self.num_shards})")
        return self


def resolve_dtype(name: str, device: torch.device, model_dir: str | Path | None = None) -> torch.dtype:
    """``auto``: float32 off CUDA; on CUDA the family's :attr:`~ddr_core.families.ModelFamily.cuda_auto_dtype` of
    the model folder ``model_dir`` (float16 for Stable Diffusion, bfloat16 for FLUX), float16 without a folder."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        if model_dir is None:
            return torch.float16
        from ddr_core.families import family_of_folder

        return getattr(torch, family_of_folder(model_dir).cuda_auto_dtype)
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def generation_seed(base_seed: int, generation_id: int) -> int:
    """The seed of one generation: a function of the base seed and the generation id only."""
    state = np.random.SeedSequence([int(base_seed), int(generation_id)]).generate_state(1, dtype=np.uint32)
    return int(state[0])


@dataclass
class CapturePlan:
    """What a capture generates: fixed by the first run, checked by every later one."""

    prompts: list[str]
    num_images_per_prompt: int
    batch_size: int
    base_seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    variants: dict[str, dict[str, Any]]
    model_version: str = ""

    @property
    def n_generations(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def n_batches(self) -> int:
        return -(-self.n_generations // self.batch_size)

    def batch_generations(self, batch_index: int) -> list[dict[str, Any]]:
        """Rows (generation_id, prompt_index, prompt, image_index, seed) of one batch."""
        first = batch_index * self.batch_size
        last = min(first + self.batch_size, self.n_generations)
        rows = []
        for gid in range(first, last):
            prompt_index, image_index = divmod(gid, self.num_images_per_prompt)
            rows.append({
                "generation_id": gid,
                "prompt_index": prompt_index,
                "prompt": self.prompts[prompt_index],
                "image_index": image_index,
                "seed": generation_seed(self.base_seed, gid),
            })
        return rows

    def identity(self) -> dict[str, Any]:
        """The fields that must match for two runs to write into one store."""
        data = self.__dict__.copy()
        data["prompts_hash"] = config_hash(data.pop("prompts"))
        return data

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, plan_hash=config_hash(self.identity()))


class CapturePlanMismatch(ValueError):
    """A store already holds a capture made with other parameters."""


def _has_generations(root: Path) -> bool:
    """Whether any batch (finished or not) or image was ever written under a capture's ``root``."""
    return any(p.is_file() for p in root.rglob("*") if p.parent != root)


def check_capture_sizes(model: Any, height: int, width: int, num_inference_steps: int) -> None:
    """Refuse sizes and step counts this model (a :class:`~ddr_core.families.ModelFamily`) cannot run, before
    anything is written.

    Raises:
        ValueError: naming the field, the model's limit and the fix.
    """
    scale = model.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if value % scale:
            raise ValueError(f"capture {name} {value} is not a multiple of the model's VAE scale factor {scale}: "
                             f"use {value // scale * scale or scale} or {value // scale * scale + scale}")
    try:  # a family's own size rule (FLUX: multiples of 16 pixels, for its 2x2 latent patches)
        model.latent_shape(height, width)
    except ValueError as error:
        raise ValueError(f"capture size {height}x{width}: {error}") from None
    train_steps = model.num_train_timesteps
    if num_inference_steps > train_steps:
        raise ValueError(f"capture num_inference_steps {num_inference_steps} exceeds the scheduler's "
                         f"{train_steps} train timesteps: use at most {train_steps}")


def fix_plan(root: Path, plan: CapturePlan, log: LogFn | None = None) -> CapturePlan:
    """Write the plan if the store has none; otherwise check that the existing one matches.

    The base seed of a plan that was drawn at random is taken from the existing plan, so a resumed
    or sharded run continues the same capture. ``model_version`` (the content hashes of the model and SAEs)
    must match too: batches made with other weights are never mixed in; a store written before versions
    were recorded (``""``) is continued with a warning.
    """
    path = Path(root) / PLAN_FILE
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        existing.pop("plan_hash", None)
        stored = CapturePlan(**existing)
        mine = plan.identity()
        theirs = stored.identity()
        if plan.base_seed < 0:  # random seed requested: adopt the stored one
            mine["base_seed"] = theirs["base_seed"]
        if not theirs["model_version"] and mine["model_version"]:
            mine["model_version"] = ""
            if log:
                log(f"{root}: this capture was started before model / SAE versions were recorded; continuing "
                    "it without checking that its batches were made with the weights now provisioned")
        diff = sorted(k for k in theirs if theirs[k] != mine.get(k))
        if diff and not _has_generations(Path(root)):  # a plan that never got a generation is replaced
            path.unlink(missing_ok=True)
            return fix_plan(root, plan, log)
        if diff:
            why = (" (the model or SAE weights were re-provisioned since this capture began: its batches "
                   "come from the old weights)" if "model_version" in diff else "")
            raise CapturePlanMismatch(
                f"{root} already holds a capture with different {', '.join(diff)}{why}; use another "
                f"experiment name (DDR_EXPERIMENT), or delete {root} to start over"
            )
        return stored
    requested_seed = plan.base_seed
    if plan.base_seed < 0:
        plan.base_seed = secrets.randbits(31)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f"{PLAN_FILE}.{os.getpid()}-{secrets.token_hex(4)}.candidate")
    try:  # first writer wins, also between concurrent shards (each writes its own candidate)
        with atomic_path(candidate) as tmp:
            tmp.write_text(json.dumps(plan.to_json(), indent=2), encoding="utf-8")
        os.link(candidate, path)
    except FileExistsError:  # another shard fixed it first: adopt its plan (and its random seed)
        plan.base_seed = requested_seed
        return fix_plan(root, plan, log)
    finally:
        candidate.unlink(missing_ok=True)
    return plan


@dataclass
class CaptureResult:
    root: Path
    batches_done: list[int] = field(default_factory=list)
    batches_skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images if self.images else float("nan")


Reducer = Callable[["torch.Tensor"], "torch.Tensor"]  # (batch, positions, channels) -> (batch, features)


def run_capture(
    pipe: Any,
    layer_name: str,
    reducers: dict[str, Reducer],
    prompts: Sequence[str],
    root: Path,
    data_root: Path,
    config: CaptureConfig,
    *,
    variant_info: dict[str, dict[str, Any]] | None = None,
    model_version: str = "",
    log: LogFn | None = None,
    stop_after_batches: int | None = None,
    lock_wait: bool | float = False,
    lock_owner: str = "",
) -> CaptureResult:
    """Generate and record; resumable and shardable (see the module docstring).

    Args:
        pipe: a :class:`~ddr_core.families.ModelFamily` or a loaded diffusers pipeline of a supported family
            (already on its device and dtype).
        layer_name: dotted name of the denoiser module to record.
        reducers: variant -> function mapping layer tokens ``(batch, positions, channels)`` (float32)
            to per-sample activations ``(batch, features)``.
        prompts: the unique prompts, in order (``config.n_prompts`` takes the first N).
        root: the capture group's store directory; ``data_root``: what image paths are relative to.
        stop_after_batches: stop after writing this many batches (tests use it to simulate a kill).
        lock_wait: when another run of the same shard is running: ``False`` fails at once with
            :class:`~ddr_core.locks.PartitionLockedError`, a number waits that many seconds, ``True``
            waits without limit. ``lock_owner``: written into the lock file (e.g. the Dagster run id).

    Everything is checked (prompts, layer name) before anything is written under ``root``.
    """
    from ddr_core.families import as_model

    model = as_model(pipe)
    root = check_output_folder(Path(root), data_root, "capture folder")  # no link out, nothing written yet
    device = model.device
    prompts = list(prompts)[: config.n_prompts] if config.n_prompts else list(prompts)
    if not prompts:
        raise ValueError("no prompts to capture: the prompt dataset is empty")
    images_per_prompt = config.num_images_per_prompt or (5 if device.type == "cuda" else 1)
    default_height, default_width = model.default_size
    height = config.height or default_height
    width = config.width or default_width
    layer = model.hook_point(layer_name)  # a wrong name fails here, before anything is written
    check_capture_sizes(model, height, width, config.num_inference_steps)  # likewise
    owner = lock_owner or f"capture {root.name} shard {config.shard_index}/{config.num_shards}"
    root.mkdir(parents=True, exist_ok=True)
    with partition_lock(shard_lock_path(root, config.shard_index, config.num_shards), wait=lock_wait,
                        owner=owner):
        group_lock = OwnedFlock(root / GROUP_LOCK_FILE, owner=owner)
        try:
            alone = True
            try:
                group_lock.acquire(wait=False)  # exclusive: no other shard is running
            except PartitionLockedError:
                alone = False
            return _run_capture_locked(
                model, layer, layer_name, reducers, prompts, root, data_root, config, group_lock, alone,
                CapturePlan(
                    prompts=prompts, num_images_per_prompt=images_per_prompt, batch_size=config.batch_size,
                    base_seed=config.seed if config.seed is not None else -1,
                    num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                    height=height, width=width, variants=variant_info or {v: {} for v in reducers},
                    model_version=model_version,
                ),
                log=log, stop_after_batches=stop_after_batches,
            )
        finally:
            group_lock.release()


def _run_capture_locked(
    model: Any, layer: Any, layer_name: str, reducers: dict[str, Reducer], prompts: list[str], root: Path,
    data_root: Path, config: CaptureConfig, group_lock: OwnedFlock, alone: bool, new_plan: CapturePlan, *,
    log: LogFn | None, stop_after_batches: int | None,
) -> CaptureResult:
    """The body of :func:`run_capture`, run while this shard's lock is held.

    ``group_lock`` is held exclusively when ``alone`` (no other shard running), else not held.
    """
    from ddr_core.hooks import capture_activations
    from ddr_core.layer_vectors import (
        VECTORS_DIRNAME,
        VectorSamplingConfig,
        maybe_collect_layer_vectors,
        write_vector_batch,
    )
    from ddr_core.progress import Progress

    device = model.device
    store = ActivationStore(root)
    # Nothing is written under ``root`` without the group lock: exclusive (alone) for the full clean-up, shared
    # otherwise. A shard that is not alone waits for the shared lock *before* writing its plan candidate, so an
    # exclusive holder's clean-up (which removes temporaries) can never remove a file another shard is writing.
    if alone:  # no other shard is writing: every leftover of a killed run can go
        plan = fix_plan(root, new_plan, log)
        store.clean_unfinished()
        group_lock.release()
    group_lock.shared = True
    group_lock.acquire(wait=FINALIZE_LOCK_WAIT_S)  # excludes finalize / full cleaning by others
    if not alone:  # others may be writing their batches: remove only the leftovers of ours
        plan = fix_plan(root, new_plan, log)
        _remove_unfinished_batch_files(store, _shard_batches(plan, config))
    sampling = (VectorSamplingConfig(positions_per_call=config.sae_vector_positions_per_call,
                                     every_n_timesteps=config.sae_vector_every_n_timesteps, seed=plan.base_seed)
                if config.sae_vectors else None)
    mine = sorted(_shard_batches(plan, config))
    finished = store.finished_batches()
    todo = [b for b in mine if b not in finished]
    result = CaptureResult(root=root, batches_skipped=[b for b in mine if b in finished])
    if result.batches_skipped and log:
        log(f"resuming: {len(result.batches_skipped)} of {len(mine)} batches already finished")

    cfg = model.uses_cfg(plan.guidance_scale)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with Progress(len(mine), f"capture {root.name}", log=log, unit="batch",
                  initial=len(result.batches_skipped)) as progress:
        for batch_index in todo:
            rows = plan.batch_generations(batch_index)
            latents = model.initial_latents([r["seed"] for r in rows], plan.height, plan.width,
                                            dtype=model.dtype, device=device)
            generation_ids = [r["generation_id"] for r in rows]
            with model.track_timesteps() as tracker, capture_activations(
                layer, tracker, reducers, cfg=cfg, keep_unconditional=config.keep_unconditional,
                host_copies=config.host_copies, max_device_bytes=int(config.host_copy_buffer_mib * 2**20),
            ) as recording, maybe_collect_layer_vectors(
                layer, tracker, cfg, sampling, generation_ids
            ) as vectors, torch.inference_mode():
                images = model.generate(
                    prompts=[r["prompt"] for r in rows], latents=latents, height=plan.height,
                    width=plan.width, num_inference_steps=plan.num_inference_steps,
                    guidance_scale=plan.guidance_scale, output_type="pil",
                )
            for row, image in zip(rows, images, strict=True):
                image_path = images_dir / f"gen_{row['generation_id']:07d}.png"
                with atomic_path(image_path) as tmp:
                    image.save(tmp, format="PNG")
                row["image_path"] = relative_to_data_root(data_root, image_path)
            per_variant = {}
            for variant in reducers:
                conditional = recording.conditional[variant].permute(1, 0, 2)  # (g, T, F)
                unconditional = recording.unconditional.get(variant) if recording.unconditional else None
                if unconditional is not None:
                    unconditional = unconditional.permute(1, 0, 2)
                per_variant[variant] = VariantBatch(conditional, unconditional)
            if vectors is not None:  # before the batch's done marker, which stays the last file written
                write_vector_batch(root / VECTORS_DIRNAME, batch_index, vectors, generation_ids, layer_name)
            store.write_batch(batch_index, rows, recording.timesteps, per_variant,
                              capture_top_k=config.capture_top_k, summaries=config.store_summaries)
            result.batches_done.append(batch_index)
            result.images += len(rows)
            progress.update()
            if stop_after_batches is not None and len(result.batches_done) >= stop_after_batches:
                break
    result.seconds = time.monotonic() - start
    group_lock.release()
    all_done = store.finished_batches() >= set(range(plan.n_batches))
    if all_done:  # exclusive: finalize deletes leftovers, so no shard may be writing
        group_lock.shared = False
        group_lock.acquire(wait=FINALIZE_LOCK_WAIT_S)
        result.summary = store.finalize()
    result.summary["complete"] = all_done
    result.summary["plan"] = {k: v for k, v in plan.to_json().items() if k != "prompts"}
    result.summary["n_prompts"] = len(plan.prompts)
    return result


# --- the stage: one capture group of the project configuration --------------------------------------

def capture_group(project: Any, layout: Any, group: str, config: CaptureConfig, device: torch.device,
                  log: LogFn | None = None, stop_after_batches: int | None = None, *,
                  lock_wait: bool | float = False, lock_owner: str = "",
                  performance: PerformanceConfig | dict | None = None) -> CaptureResult:
    """Run the capture of one capture group of the project config (every variant of it at once).

    ``performance``: how the denoiser computes (:mod:`ddr_core.performance`; ``None``: the plain eager path);
    it never enters the capture plan (the same generations, within the dtype's rounding).

    Checks everything before generating or writing: the model folder, the layer name, each variant's
    width, the SAEs' ``d_in``, the prompt file; prompts longer than the tokenizer's limit are counted
    and warned. ``lock_wait`` / ``lock_owner``: see :func:`run_capture`.

    The model and SAE folders are checked against their provisioning manifests as they load; their content
    hashes go into the plan (``model_version``: a store never mixes batches of other weights) and into
    ``summary["inputs"]`` (``"models/<name>"`` / ``"saes/<name>"`` -> hash, for folders with a manifest).
    """
    from ddr_core.basis import load_basis
    from ddr_core.families import load_model
    from ddr_core.paths import file_inside
    from ddr_core.prompts import check_prompt_lengths, load_prompts, truncation_warning
    from ddr_core.provisioning import provisioned_content_hash

    root = layout.activations_dir(group)  # refuses an unsafe group name before any model is loaded
    layout.check_output_folder(root, "capture folder")  # and a folder reached through a link
    model_name, layer_name, prompts_name = project.capture_spec(group)
    variants = project.capture_groups()[group]
    dataset = project.prompt_datasets[prompts_name]
    prompt_file = file_inside(layout.prompts_dir(prompts_name), dataset.file, f"prompt_datasets.{prompts_name}.file")
    prompt_set = load_prompts(prompt_file, text_field=dataset.text_field)
    if prompt_set.invalid and log:
        log(f"prompt file: {len(prompt_set.invalid)} invalid line(s) skipped ({prompt_set.summary()})")
    dtype = resolve_dtype(config.dtype, device, layout.model_dir(model_name))
    model = load_model(layout.model_dir(model_name), device=device, dtype=dtype)
    model.read_layer_as(layer_name, project.hook_of(variants[0]))  # one hook per capture group (config checks)
    prompts = prompt_set.texts[: config.n_prompts] if config.n_prompts else prompt_set.texts
    too_long = check_prompt_lengths(prompts, model.tokenizer)
    if too_long and log:
        log(truncation_warning(len(too_long), len(prompts), model.tokenizer.model_max_length))

    reducers: dict[str, Reducer] = {}
    info: dict[str, dict[str, Any]] = {}
    inputs = {f"models/{model_name}": provisioned_content_hash(layout.model_dir(model_name))}
    for variant in variants:
        spec = project.variants[variant]
        basis = load_basis(project, layout, variant, model, device)
        reducers[variant] = basis.reduce
        info[variant] = {"basis": spec.basis, "sae": spec.sae, "layer": layer_name, "width": basis.width}
        if spec.sae:
            inputs[f"saes/{spec.sae}"] = provisioned_content_hash(layout.sae_dir(spec.sae))
    known = {key: value for key, value in sorted(inputs.items()) if value is not None}
    performance = performance_config(performance)  # a bad option fails before anything is generated
    if log and not performance.is_default:
        log(f"denoiser performance options: {performance.describe()}")
    with tuned_denoiser(model.denoiser, performance, hooked=model.hook_point(layer_name).module):
        result = run_capture(model, layer_name, reducers, prompts, root, layout.data_root,
                             config, variant_info=info, model_version=config_hash(inputs) if known else "", log=log,
                             stop_after_batches=stop_after_batches, lock_wait=lock_wait, lock_owner=lock_owner)
    result.summary["inputs"] = known
    return result
