"""Train a TopK sparse autoencoder (SAeUron format) on a UNet layer's per-position activations.

Two parts:

1. **Collection** (:mod:`ddr_core.layer_vectors`): the ``activations`` stage keeps the layer's per-position
   channel vectors when ``CaptureConfig.sae_vectors`` is on (the same pass that records the spatial means),
   so the SAE is trained on exactly the generations the statistics describe.
   ``python -m ddr_core.sae_training capture --variant V`` runs that stage
   (:func:`ddr_core.activations.capture_group`) for a raw variant alone, in its own experiment:
   a capture group that also holds the SAE variant could not run before the SAE exists.

2. **Training.** :func:`train_sae`: a TopK SAE in the recipe of SAeUron / EleutherAI ``sae``

   - ``pre = relu(W_enc (x - b_dec) + b_enc)``; the ``k`` largest entries of ``pre`` are kept and
     ``x_hat = sum_j pre_j W_dec[j] + b_dec`` (what :class:`ddr_core.sae.Sae` computes);
   - ``b_dec`` starts at the geometric median of the training vectors, ``W_dec`` at the (row
     normalised) encoder weight;
   - loss = FVU (squared error over the batch's total variance) ``+ auxk_alpha * AuxK``, where AuxK
     asks the ``k_aux`` largest pre-activations of *dead* latents (none of whose activations made the
     top-k in the last ``dead_feature_threshold`` training vectors) to reconstruct the residual
     ``x - x_hat`` (Gao et al. 2024), scaled by ``min(1, dead / k_aux)``;
   - decoder rows kept at unit norm (the gradient component along each row removed before the step,
     rows renormalised after it), gradient norm clipped to 1, Adam with linear warm-up;
   - seeded: the same vectors, config and thread count give bitwise identical weights on CPU.

   The report gives the fraction of variance explained (FVE = 1 - FVU) and the dead latents on
   held-out *generations* (every vector of a generation is either train or eval), the training
   curve, and the config. The SAE is written with :func:`ddr_core.sae.save_sae` into
   ``<out>/unet.<layer>/`` (``cfg.json`` + ``sae.safetensors``), loadable by
   :func:`ddr_core.sae.load_sae` / :func:`ddr_core.sae.find_sae_folder`; ``<out>/training_report.json``
   beside it.

CLI::

    python -m ddr_core.sae_training capture --variant toy-raw [--config FILE] [--data-root DIR]
        [--experiment sae-training] [--images-per-prompt 5] [--steps 25] [--guidance-scale 3]
        [--batch-size 36] [--seed 0] [--positions-per-call N] [--every-n-timesteps 1]
    python -m ddr_core.sae_training train (--activations-dir CAPTURE_DIR | --vectors DIR) --out SAE_ROOT
        [--layer up_blocks.1.attentions.1] [--expansion-factor 4] [--k 8] [--steps 3000] ...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ddr_core.atomic import atomic_write_json
from ddr_core.layer_vectors import (  # noqa: F401 - the collection API, re-exported for old imports
    HALF_CONDITIONAL,
    HALF_UNCONDITIONAL,
    VECTORS_DIRNAME,
    VECTORS_FORMAT,
    LayerVectors,
    VectorSamplingConfig,
    VectorSet,
    collect_layer_vectors,
    load_vectors,
    maybe_collect_layer_vectors,
    resolve_vectors_dir,
    vector_batch_path,
    write_vector_batch,
)
from ddr_core.sae import FOLDER_PREFIX, Sae, SaeConfig, save_sae
from ddr_core.variant_inputs import variant_spec

LogFn = Callable[[str], None]

REPORT_FILENAME = "training_report.json"
DEFAULT_LAYER = "up_blocks.1.attentions.1"


def capture_vectors_for_variant(
    project: Any,
    data_root: str | Path,
    variant: str,
    capture_config: Any,
    device: torch.device,
    *,
    experiment: str = "sae-training",
    log: LogFn | None = None,
) -> Path:
    """Capture a raw variant's layer with the ``activations`` stage's own code and keep the vectors.

    Runs :func:`ddr_core.activations.capture_group` (what the ``activations`` asset runs) on the
    project configuration restricted to ``variant`` (so the capture needs no SAE yet: an SAE variant
    of the same capture group would need the SAE being trained), in experiment ``experiment`` of
    ``data_root``, with ``sae_vectors`` on. The model and prompt dataset are provisioned there first.
    Returns the capture folder (its ``sae_vectors/`` holds the vector batches). A killed run resumes.
    """
    from ddr_core.activations import capture_group
    from ddr_core.catalog import provision_entry
    from ddr_core.paths import DataLayout

    spec = variant_spec(project, variant)
    if spec.basis != "raw":
        raise ValueError(f"variant {variant!r} has basis {spec.basis!r}; SAE training data comes from the raw "
                         f"layer: pass the raw variant of the same model and layer")
    restricted = project.model_copy(update={"variants": {variant: spec}, "default_variants": [variant]})
    layout = DataLayout(data_root, experiment)
    provision_entry(restricted, layout, "model", spec.model, log=log)
    provision_entry(restricted, layout, "prompts", spec.prompts, log=log)
    config = capture_config.model_copy(update={"sae_vectors": True})
    group = restricted.capture_of(variant)
    result = capture_group(restricted, layout, group, config, device, log=log)
    if not result.summary.get("complete"):
        raise RuntimeError(f"the capture of {group!r} did not complete; run it again to resume")
    return result.root


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class SaeTrainingConfig(BaseModel):
    """Shape, sparsity and optimisation of one TopK SAE training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expansion_factor: int = Field(4, ge=1, description="num_latents = d_in x this (when num_latents is 0)")
    num_latents: int = Field(0, ge=0, description="dictionary size; 0: d_in x expansion_factor")
    k: int = Field(8, ge=1, description="active latents per vector")
    normalize_decoder: bool = True
    input_unit_norm: bool = Field(False, description="standardise each input vector (SAeUron option)")
    steps: int = Field(3000, ge=1, description="optimiser steps")
    batch_size: int = Field(1024, ge=1, description="vectors per step")
    learning_rate: float | None = Field(
        None, gt=0, description="Adam learning rate; None: 2e-4 / sqrt(num_latents / 2**14) (EleutherAI)")
    lr_warmup_steps: int = Field(100, ge=0)
    auxk_alpha: float = Field(1 / 32, ge=0, description="weight of the dead-latent auxiliary loss; 0: off")
    k_aux: int | None = Field(None, ge=1, description="latents of the auxiliary reconstruction; None: d_in // 2")
    dead_feature_threshold: int = Field(
        100_000, ge=1, description="a latent is dead after this many training vectors without a top-k entry")
    grad_clip_norm: float | None = Field(1.0, gt=0)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of generations held out for the report")
    max_train_vectors: int | None = Field(None, ge=1, description="random subset of the training vectors")
    geometric_median_iterations: int = Field(50, ge=0, description="Weiszfeld steps of the b_dec init; 0: mean")
    seed: int = Field(0, ge=0)
    log_every: int = Field(250, ge=1)

    @model_validator(mode="after")
    def _k_fits(self) -> SaeTrainingConfig:
        if self.num_latents and self.k > self.num_latents:
            raise ValueError(f"k={self.k} exceeds num_latents={self.num_latents}")
        return self

    def resolved_latents(self, d_in: int) -> int:
        latents = self.num_latents or d_in * self.expansion_factor
        if self.k > latents:
            raise ValueError(f"k={self.k} exceeds the {latents} latents of this SAE; lower k or raise the size")
        return latents

    def resolved_lr(self, num_latents: int) -> float:
        return self.learning_rate or 2e-4 / math.sqrt(num_latents / 2**14)


def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Geometric median of ``points (n, d)`` by Weiszfeld's algorithm, started at the mean; ``(d,)``."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(eps)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if torch.allclose(updated, median, atol=1e-7, rtol=0):
            return updated
        median = updated
    return median


def _standardise(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred / (centred.std(dim=-1, keepdim=True) + 1e-5)


def _sparse_codes(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(n, L)`` codes keeping the top-k of ``pre`` per row, and their indices ``(n, k)``."""
    top = pre.topk(k, dim=-1, sorted=False)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return codes, top.indices


@torch.no_grad()
def _normalise_decoder(sae: Sae) -> None:
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


@torch.no_grad()
def _remove_parallel_gradient(sae: Sae) -> None:
    if sae.W_dec.grad is None:
        return
    along = (sae.W_dec.grad * sae.W_dec).sum(dim=1, keepdim=True)
    sae.W_dec.grad.sub_(along * sae.W_dec)


@torch.no_grad()
def evaluate_sae(sae: Sae, vectors: torch.Tensor, batch_size: int = 8192) -> dict[str, Any]:
    """Reconstruction quality and latent use of ``sae`` on ``vectors (n, d_in)``.

    Returns ``fve`` (1 - total squared error / total variance, in the space the SAE reconstructs:
    standardised inputs when ``input_unit_norm``), ``mse``, ``dead_latents`` (never in a top-k here),
    ``dead_fraction``, ``fire_counts`` (top-k entries per latent), ``n``.
    """
    fire = torch.zeros(sae.num_latents, dtype=torch.int64)
    squared_error = 0.0
    n = vectors.shape[0]
    inputs = _standardise(vectors) if sae.cfg.input_unit_norm else vectors
    mean = inputs.mean(dim=0)
    total_variance = float(((inputs - mean) ** 2).sum())
    for start in range(0, n, batch_size):
        chunk = vectors[start:start + batch_size]
        values, indices = sae.topk(chunk)
        reconstruction = sae.decode(values, indices)
        target = inputs[start:start + batch_size]
        squared_error += float(((reconstruction - target) ** 2).sum())
        fire += torch.bincount(indices.flatten(), minlength=sae.num_latents)
    dead = int((fire == 0).sum())
    return {"n": int(n), "fve": 1.0 - squared_error / max(total_variance, 1e-12),
            "mse": squared_error / max(n * sae.d_in, 1), "dead_latents": dead,
            "dead_fraction": dead / sae.num_latents, "fire_counts": fire.tolist()}


def split_by_generation(generation_ids: torch.Tensor, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks ``(train, eval)`` over rows: a seeded ``eval_fraction`` of the generations (at least
    one when there are two or more and the fraction is positive) is held out whole."""
    unique = torch.unique(generation_ids)
    n_eval = int(round(len(unique) * eval_fraction))
    if eval_fraction > 0 and len(unique) > 1:
        n_eval = min(max(n_eval, 1), len(unique) - 1)
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    held_out = unique[order[:n_eval]]
    eval_mask = torch.isin(generation_ids, held_out)
    return ~eval_mask, eval_mask


def topk_sae_losses(
    sae: Sae, x: torch.Tensor, k: int, dead: torch.Tensor | None, k_aux: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training losses of one batch ``x (n, d_in)`` (already standardised if ``input_unit_norm``).

    Returns:
        ``(fvu, auxk, indices)``: FVU = squared reconstruction error over the batch's total variance;
        AuxK = the same for the reconstruction of the detached residual ``x - x_hat`` from the
        ``min(k_aux, dead)`` largest pre-activations of the ``dead`` latents (mask ``(num_latents,)``),
        times ``min(1, dead / k_aux)`` (0 when ``dead`` is ``None`` or empty; it trains only dead
        latents); ``indices (n, k)`` the latents in each top-k.
    """
    pre = torch.relu(sae.encoder(x - sae.b_dec))
    codes, indices = _sparse_codes(pre, k)
    reconstruction = codes @ sae.W_dec + sae.b_dec
    total_variance = ((x - x.mean(dim=0)) ** 2).sum().clamp_min(1e-12)
    fvu = ((reconstruction - x) ** 2).sum() / total_variance
    n_dead = int(dead.sum()) if dead is not None else 0
    if not n_dead:
        return fvu, torch.zeros((), dtype=fvu.dtype), indices
    top_dead = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1)
    aux_codes = torch.zeros_like(pre).scatter(-1, top_dead.indices, top_dead.values)
    residual = (x - reconstruction).detach()
    auxk = ((aux_codes @ sae.W_dec - residual) ** 2).sum() / total_variance * min(1.0, n_dead / k_aux)
    return fvu, auxk, indices


@dataclass
class SaeTrainingResult:
    sae: Sae
    report: dict[str, Any]


def train_sae(
    vectors: torch.Tensor,
    config: SaeTrainingConfig | None = None,
    generation_ids: torch.Tensor | None = None,
    log: LogFn | None = None,
) -> SaeTrainingResult:
    """Train a TopK SAE on ``vectors (n, d_in)`` (see the module docstring for the recipe).

    Args:
        vectors: float training vectors, one per (generation, timestep, half, position).
        config: the run; defaults to ``SaeTrainingConfig()``.
        generation_ids: ``(n,)`` generation of each vector; the held-out split is by generation.
            ``None``: rows are split individually.

    Returns:
        The SAE (eval mode, CPU float32) and a report: ``train`` / ``eval`` quality
        (:func:`evaluate_sae` without the fire counts), ``curve`` (step, loss, fvu, auxk, dead),
        ``config``, ``seconds``.
    """
    config = config or SaeTrainingConfig()
    say = log or (lambda _message: None)
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(f"train_sae needs vectors (n >= 2, d_in), got shape {tuple(vectors.shape)}")
    vectors = vectors.float()
    if not torch.isfinite(vectors).all():
        raise ValueError("the training vectors contain NaN or inf; check the capture (dtype overflow?)")
    started = time.perf_counter()
    n, d_in = vectors.shape
    ids = generation_ids if generation_ids is not None else torch.arange(n)
    train_mask, eval_mask = split_by_generation(ids, config.eval_fraction, config.seed)
    train = vectors[train_mask]
    held_out = vectors[eval_mask]
    generator = torch.Generator().manual_seed(config.seed)
    if config.max_train_vectors and train.shape[0] > config.max_train_vectors:
        train = train[torch.randperm(train.shape[0], generator=generator)[: config.max_train_vectors]]
    num_latents = config.resolved_latents(d_in)
    k_aux = config.k_aux or max(d_in // 2, 1)
    sae_cfg = SaeConfig(d_in=d_in, num_latents=num_latents, k=config.k, normalize_decoder=config.normalize_decoder,
                        expansion_factor=num_latents // d_in if num_latents % d_in == 0 else 0,
                        input_unit_norm=config.input_unit_norm)
    sae = Sae(sae_cfg)
    inputs = _standardise(train) if config.input_unit_norm else train
    with torch.no_grad():
        bound = 1.0 / math.sqrt(d_in)
        weight = (torch.rand(num_latents, d_in, generator=generator) * 2 - 1) * bound
        sae.encoder.weight.copy_(weight)
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(weight)
        if config.normalize_decoder:
            _normalise_decoder(sae)
        sample = inputs[torch.randperm(inputs.shape[0], generator=generator)[: min(inputs.shape[0], 32_768)]]
        sae.b_dec.copy_(geometric_median(sample, config.geometric_median_iterations)
                        if config.geometric_median_iterations else sample.mean(dim=0))
    lr = config.resolved_lr(num_latents)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(num_latents, dtype=torch.int64)
    curve: list[dict[str, float]] = []
    order = torch.randperm(inputs.shape[0], generator=generator)
    cursor = 0
    batch_size = min(config.batch_size, inputs.shape[0])
    sae.train()
    for step in range(config.steps):
        if cursor + batch_size > order.numel():
            order = torch.randperm(inputs.shape[0], generator=generator)
            cursor = 0
        x = inputs[order[cursor:cursor + batch_size]]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else lr
        dead = since_fired > config.dead_feature_threshold
        n_dead = int(dead.sum())
        fvu, auxk, indices = topk_sae_losses(sae, x, config.k, dead if config.auxk_alpha > 0 else None, k_aux)
        loss = fvu + config.auxk_alpha * auxk
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.normalize_decoder:
            _remove_parallel_gradient(sae)
        if config.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip_norm)
        optimizer.step()
        if config.normalize_decoder:
            _normalise_decoder(sae)
        with torch.no_grad():
            fired = torch.zeros(num_latents, dtype=torch.bool)
            fired[indices.flatten()] = True
            since_fired += batch_size
            since_fired[fired] = 0
        if step % config.log_every == 0 or step == config.steps - 1:
            point = {"step": step, "loss": loss.item(), "fvu": fvu.item(), "auxk": auxk.item(), "dead": n_dead}
            curve.append(point)
            say(f"step {step}: fvu {point['fvu']:.4f} auxk {point['auxk']:.4f} dead {n_dead}/{num_latents}")
    optimizer.zero_grad(set_to_none=True)
    sae.eval()
    train_quality = evaluate_sae(sae, train)
    eval_quality = evaluate_sae(sae, held_out) if held_out.shape[0] else None
    fire_counts = train_quality.pop("fire_counts")
    if eval_quality is not None:
        eval_quality.pop("fire_counts")
    report = {
        "d_in": d_in, "num_latents": num_latents, "k": config.k, "learning_rate": lr, "k_aux": k_aux,
        "vectors": {"total": int(n), "train": int(train.shape[0]), "eval": int(held_out.shape[0]),
                    "train_generations": int(torch.unique(ids[train_mask]).numel()),
                    "eval_generations": int(torch.unique(ids[eval_mask]).numel())},
        "train": train_quality, "eval": eval_quality,
        "dead_latents_at_end_of_training": int((since_fired > config.dead_feature_threshold).sum()),
        "latent_fire_counts_train": fire_counts,
        "curve": curve, "config": config.model_dump(), "seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    return SaeTrainingResult(sae=sae, report=report)


def save_trained_sae(result: SaeTrainingResult, out_root: str | Path, layer_name: str,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write ``<out_root>/unet.<layer>/`` (SAeUron format) and ``<out_root>/training_report.json``;
    returns the SAE folder."""
    from ddr_core.paths import check_name

    out_root = Path(out_root)
    folder = save_sae(result.sae, out_root / f"{FOLDER_PREFIX}{check_name(layer_name, 'layer')}")
    atomic_write_json(out_root / REPORT_FILENAME, {"layer": layer_name, **result.report, **(extra or {})})
    return folder


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _summary_line(report: dict[str, Any]) -> str:
    parts = [f"train FVE {report['train']['fve']:.4f}, dead {report['train']['dead_latents']}/{report['num_latents']}"]
    if report.get("eval"):
        parts.append(f"eval FVE {report['eval']['fve']:.4f}, dead {report['eval']['dead_latents']}/{report['num_latents']}")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Collect a UNet layer's per-position activations and train a "
                                                 "TopK SAE on them (SAeUron format).")
    commands = parser.add_subparsers(dest="command", required=True)
    capture = commands.add_parser(
        "capture", help="capture a raw variant with the activations stage's code and keep the layer's vectors")
    capture.add_argument("--variant", required=True, help="raw variant of the project config (e.g. toy-raw)")
    capture.add_argument("--config", default=None, help="project config (default: DDR_CONFIG / config/ddr.yaml)")
    capture.add_argument("--data-root", default=None, help="data root (default: DDR_DATA_ROOT / data)")
    capture.add_argument("--experiment", default="sae-training")
    capture.add_argument("--images-per-prompt", type=int, default=5)
    capture.add_argument("--steps", type=int, default=25, help="denoising steps")
    capture.add_argument("--guidance-scale", type=float, default=3.0)
    capture.add_argument("--batch-size", type=int, default=36)
    capture.add_argument("--seed", type=int, default=0)
    capture.add_argument("--positions-per-call", type=int, default=None)
    capture.add_argument("--every-n-timesteps", type=int, default=1)
    capture.add_argument("--device", default="cpu")
    train = commands.add_parser("train", help="train a TopK SAE on collected vectors")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--activations-dir", nargs="+", help="capture folder(s) holding sae_vectors/")
    source.add_argument("--vectors", nargs="+", help="folder(s) of batch_*.safetensors")
    train.add_argument("--out", required=True, help="SAE root: writes unet.<layer>/ and training_report.json")
    train.add_argument("--layer", default=None, help="layer name (default: the one recorded in the vectors)")
    for name, kind in (("expansion-factor", int), ("num-latents", int), ("k", int), ("steps", int),
                       ("batch-size", int), ("learning-rate", float), ("auxk-alpha", float),
                       ("dead-feature-threshold", int), ("eval-fraction", float), ("max-train-vectors", int),
                       ("seed", int), ("log-every", int)):
        train.add_argument(f"--{name}", type=kind, default=None)
    train.add_argument("--input-unit-norm", action="store_true")
    for command in (capture, train):
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def say(message: str) -> None:
        print(f"[sae_training] {message}", flush=True)

    if args.command == "capture":
        from ddr_core.activations import CaptureConfig
        from ddr_core.config import data_root, load_project_config

        project = load_project_config(args.config)
        config = CaptureConfig(num_images_per_prompt=args.images_per_prompt, num_inference_steps=args.steps,
                               guidance_scale=args.guidance_scale, batch_size=args.batch_size, seed=args.seed,
                               sae_vector_positions_per_call=args.positions_per_call,
                               sae_vector_every_n_timesteps=args.every_n_timesteps)
        root = capture_vectors_for_variant(project, args.data_root or data_root(), args.variant, config,
                                           torch.device(args.device), experiment=args.experiment, log=say)
        say(f"vectors in {root / VECTORS_DIRNAME}; train with: python -m ddr_core.sae_training train "
            f"--activations-dir {root} --out SAE_ROOT")
        return 0

    folders = args.activations_dir or args.vectors
    data = load_vectors(folders, args.layer)
    overrides = {name: getattr(args, name) for name in (
        "expansion_factor", "num_latents", "k", "steps", "batch_size", "learning_rate", "auxk_alpha",
        "dead_feature_threshold", "eval_fraction", "max_train_vectors", "seed", "log_every")
        if getattr(args, name) is not None}
    if args.input_unit_norm:
        overrides["input_unit_norm"] = True
    config = SaeTrainingConfig(**overrides)
    say(f"{data.vectors.shape[0]} vectors of width {data.width} (layer {data.layer}) from {len(data.files)} files")
    result = train_sae(data.vectors, config, data.generation_ids, log=say)
    folder = save_trained_sae(result, args.out, data.layer,
                              extra={"sources": [str(Path(f).resolve()) for f in data.files]})
    say(f"{_summary_line(result.report)}; saved {folder} ({result.report['seconds']:.0f}s)")
    print(json.dumps({k: result.report[k] for k in ("d_in", "num_latents", "k", "train", "eval")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
