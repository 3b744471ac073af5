"""Conditional vs unconditional: which features the text drives and which the image does (``cfg_contrast``).

With classifier-free guidance every denoising step runs the denoiser twice on the same latents: once with
the prompt (the **conditional** half) and once with the empty prompt (the **unconditional** half). The
activation store keeps both halves apart (:mod:`ddr_core.activation_store`); ``timestep_stats`` analyses one.
This stage compares them per channel: a feature whose activation is the same with and without the prompt
is driven by the image (the latents), one that differs is driven by the text.

The unit of evidence is the **prompt**, not the generation: the images of one prompt share its text, so
they are averaged first (``num_images_per_prompt`` images -> one value per prompt), and every interval and
p-value is over prompts. Per channel ``c`` and prompt ``p``::

    d[p, c] = mean over p's images and the recorded timesteps of (conditional - unconditional)

- ``difference`` = mean of ``d`` over prompts, its two-sided t-interval (``confidence``) and a one-sample
  t-test of ``d = 0`` over prompts (``df = prompts - 1``), Benjamini-Hochberg q-values over the channels;
- ``text_share`` = ``difference / mean |conditional|`` (how much of the channel's activation the text adds
  or removes; ``None`` where the channel is silent);
- per timestep (``profiles.parquet``): both halves' prompt-mean activation and their difference with its
  t-interval over prompts, for the feature card's chart.

Memory is bounded by one store batch plus ``(T, F)`` accumulators and the ``(prompts, F)`` matrix ``d``,
never the whole store: prompts are folded into the per-timestep moments (Welford) as soon as all their
images have been read (generations are stored in ``generation_id`` order, so few prompts are open at once).

Guidance-free variants (SDXL-Turbo at ``guidance_scale`` 0, FLUX.1) record one half: the stage writes a
summary saying so and no tables, and the feature card says the comparison does not exist for that model.

Outputs (``out_dir``): ``channels.parquet`` (one row per channel), ``profiles.parquet`` (channel x
timestep), ``prompt_effects.parquet`` (one row per prompt: its text and ``d[p, :]`` as a fixed-size array, for
scores against a ground truth such as :mod:`ddr_core.cfg_truth`), ``summary.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from ddr_core.activation_store import ActivationStore, ActivationStoreError
from ddr_core.atomic import atomic_path, atomic_write_json
from ddr_core.config import config_hash
from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    from scipy import stats
else:
    stats = lazy_module("scipy.stats")

CHANNELS_FILE = "channels.parquet"
PROFILES_FILE = "profiles.parquet"
PROMPT_EFFECTS_FILE = "prompt_effects.parquet"
SUMMARY_FILE = "summary.json"
CFG_CONTRAST_VERSION = 2  # 2: prompt_effects.parquet


class CfgContrastConfig(BaseModel):
    """Settings of the conditional-vs-unconditional comparison."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="q-value below which a channel is called text-driven")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="level of the t-intervals over prompts")

    def resolved(self) -> dict[str, Any]:
        return {**self.model_dump(), "version": CFG_CONTRAST_VERSION}

    def config_hash(self) -> str:
        return config_hash(self.resolved())


@dataclass
class CfgContrastSummary:
    """What :func:`compute_cfg_contrast` found (also ``summary.json``)."""

    variant: str
    halves: int
    n_prompts: int
    n_generations: int
    width: int
    text_driven: int
    text_suppressed: int
    alpha: float
    confidence: float
    config_hash: str
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Moments:
    """Running mean and sum of squared deviations over prompts (Welford), one cell per (timestep, channel)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.count = 0
        self.mean = np.zeros(shape, dtype=np.float64)
        self.m2 = np.zeros(shape, dtype=np.float64)

    def add(self, value: np.ndarray) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    def interval(self, confidence: float) -> tuple[np.ndarray, np.ndarray]:
        """The two-sided t-interval of the mean (NaN with fewer than two prompts)."""
        if self.count < 2:
            nan = np.full_like(self.mean, np.nan)
            return nan, nan
        half_width = stats.t.ppf(0.5 + confidence / 2, self.count - 1) * np.sqrt(
            self.m2 / (self.count - 1) / self.count)
        return self.mean - half_width, self.mean + half_width


def _has_unconditional(store: ActivationStore, variant: str) -> bool:
    try:
        next(store.iter_dense(variant, "unconditional"))
    except ActivationStoreError as error:
        if "no 'unconditional' activations" in str(error):
            return False
        raise
    return True


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def compute_cfg_contrast(store: ActivationStore, variant: str, out_dir: str | os.PathLike[str],
                         config: CfgContrastConfig | None = None) -> CfgContrastSummary:
    """Compare the two CFG halves of ``variant`` per channel and timestep; write the tables into ``out_dir``.

    Args:
        store: the capture group's activation store (finished batches are read, one at a time).
        variant: a variant recorded in ``store``.
        out_dir: created; ``channels.parquet``, ``profiles.parquet`` and ``summary.json`` are (re)written.
        config: test level and interval confidence.

    Returns:
        The summary; ``halves == 1`` (and a ``reason``, no tables) for a capture without the unconditional half.
    """
    config = config or CfgContrastConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generations = store.read_generations()
    timesteps = store.timesteps()
    width = store.width(variant)
    base = dict(variant=variant, n_generations=int(generations.height), width=width, alpha=config.alpha,
                confidence=config.confidence, config_hash=config.config_hash())
    if not _has_unconditional(store, variant):
        summary = CfgContrastSummary(
            halves=1, n_prompts=int(generations["prompt_index"].n_unique()), text_driven=0, text_suppressed=0,
            reason="the capture recorded only the conditional half (no classifier-free guidance: "
                   "guidance_scale <= 1, keep_unconditional false, or a guidance-free model such as "
                   "SDXL-Turbo or FLUX.1): there is no unconditional activity to compare", **base)
        # a previous two-half result of this folder is not this one
        for name in (CHANNELS_FILE, PROFILES_FILE, PROMPT_EFFECTS_FILE):
            (out / name).unlink(missing_ok=True)
        atomic_write_json(out / SUMMARY_FILE, summary.to_dict())
        return summary

    prompt_of = dict(zip(generations["generation_id"].to_list(), generations["prompt_index"].to_list(), strict=True))
    images_of = generations.group_by("prompt_index").len().rows()
    expected = {int(p): int(n) for p, n in images_of}
    prompts = sorted(expected)
    row_of = {p: i for i, p in enumerate(prompts)}
    n_t = len(timesteps)
    moments = {half: _Moments((n_t, width)) for half in ("conditional", "unconditional", "difference")}
    per_prompt = np.full((len(prompts), width), np.nan, dtype=np.float64)
    open_sums: dict[int, list[Any]] = {}  # prompt -> [sum conditional (T, F), sum unconditional (T, F), images]

    def close(prompt: int) -> None:
        cond_sum, uncond_sum, count = open_sums.pop(prompt)
        cond, uncond = cond_sum / count, uncond_sum / count
        moments["conditional"].add(cond)
        moments["unconditional"].add(uncond)
        moments["difference"].add(cond - uncond)
        per_prompt[row_of[prompt]] = (cond - uncond).mean(axis=0)

    for (ids, _, cond), (ids_u, _, uncond) in zip(store.iter_dense(variant, "conditional"),
                                                  store.iter_dense(variant, "unconditional"), strict=True):
        if not np.array_equal(ids, ids_u):
            raise ActivationStoreError(f"variant {variant!r}: a batch's two halves hold different generations")
        for row, generation_id in enumerate(ids.tolist()):
            prompt = int(prompt_of[generation_id])
            sums = open_sums.setdefault(prompt, [np.zeros((n_t, width)), np.zeros((n_t, width)), 0])
            sums[0] += cond[row]
            sums[1] += uncond[row]
            sums[2] += 1
            if sums[2] == expected[prompt]:
                close(prompt)
    for prompt in list(open_sums):  # cannot happen with a finalized store; kept so no generation is dropped
        close(prompt)

    seen = ~np.isnan(per_prompt[:, 0]) if width else np.zeros(len(prompts), dtype=bool)
    d = per_prompt[seen]
    n_prompts = int(d.shape[0])
    mean_cond = moments["conditional"].mean.mean(axis=0)
    mean_uncond = moments["unconditional"].mean.mean(axis=0)
    difference = d.mean(axis=0) if n_prompts else np.full(width, np.nan)
    if n_prompts >= 2:
        sd = d.std(axis=0, ddof=1)
        half_width = stats.t.ppf(0.5 + config.confidence / 2, n_prompts - 1) * sd / np.sqrt(n_prompts)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_stat = difference / (sd / np.sqrt(n_prompts))
        p_value = 2 * stats.t.sf(np.abs(t_stat), n_prompts - 1)
        p_value = np.where(sd > 0, p_value, np.where(difference == 0, 1.0, 0.0))  # constant d: exact answer
        q_value = stats.false_discovery_control(p_value) if width else p_value
        low, high = difference - half_width, difference + half_width
    else:
        low = high = p_value = q_value = np.full(width, np.nan)
    scale = np.abs(moments["conditional"].mean).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(scale > 0, difference / scale, np.nan)
    significant = q_value < config.alpha
    verdict = np.where(significant & (difference > 0), "text-driven",
                       np.where(significant & (difference < 0), "text-suppressed", "no evidence"))
    channels = pl.DataFrame({
        "channel": np.arange(width, dtype=np.int32),
        "mean_conditional": mean_cond, "mean_unconditional": mean_uncond,
        "difference": difference, "ci_low": low, "ci_high": high,
        "text_share": share, "p_value": p_value, "q_value": q_value,
        "n_prompts": np.full(width, n_prompts, dtype=np.int32), "verdict": verdict,
    })
    diff_low, diff_high = moments["difference"].interval(config.confidence)
    profiles = pl.DataFrame({
        "channel": np.tile(np.arange(width, dtype=np.int32), n_t),
        "timestep": np.repeat(np.asarray(timesteps, dtype=np.int64), width),
        "mean_conditional": moments["conditional"].mean.ravel(),
        "mean_unconditional": moments["unconditional"].mean.ravel(),
        "difference": moments["difference"].mean.ravel(),
        "ci_low": diff_low.ravel(), "ci_high": diff_high.ravel(),
    }).sort("channel", "timestep", descending=[False, True])
    text_of = dict(zip(generations["prompt_index"].to_list(), generations["prompt"].to_list(), strict=True)) \
        if "prompt" in generations.columns else {}
    seen_prompts = [p for p, kept in zip(prompts, seen, strict=True) if kept]
    prompt_effects = pl.DataFrame({
        "prompt_index": np.asarray(seen_prompts, dtype=np.int64),
        "prompt": [text_of.get(p) for p in seen_prompts],
        "effect": pl.Series(d.astype(np.float32), dtype=pl.Array(pl.Float32, width)),
    }, schema_overrides={"prompt": pl.String})
    _write_parquet(channels, out / CHANNELS_FILE)
    _write_parquet(profiles, out / PROFILES_FILE)
    _write_parquet(prompt_effects, out / PROMPT_EFFECTS_FILE)
    summary = CfgContrastSummary(halves=2, n_prompts=n_prompts, text_driven=int((verdict == "text-driven").sum()),
                                 text_suppressed=int((verdict == "text-suppressed").sum()), **base)
    atomic_write_json(out / SUMMARY_FILE, summary.to_dict())
    return summary


def finished_cfg_contrast(out_dir: str | os.PathLike[str], variant: str,
                          config: CfgContrastConfig) -> CfgContrastSummary | None:
    """The summary of ``out_dir`` when it is a finished result of ``variant`` with ``config`` (same
    ``config_hash``, and both tables present for a two-half capture); ``None`` otherwise (compute it). Whether the
    capture it was computed from is the current one is the caller's question (its record's data version)."""
    out = Path(out_dir)
    try:
        found = read_cfg_contrast(out)
        summary = CfgContrastSummary(**found) if found else None
    except (OSError, ValueError, TypeError):
        return None
    if summary is None or summary.variant != variant or summary.config_hash != config.config_hash():
        return None
    if summary.halves == 2 and not all((out / name).is_file()
                                       for name in (CHANNELS_FILE, PROFILES_FILE, PROMPT_EFFECTS_FILE)):
        return None
    return summary


def read_cfg_contrast(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stage's summary, or ``None`` where it has not run."""
    path = Path(out_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def channel_contrast(out_dir: str | os.PathLike[str], channel: int
                     ) -> tuple[dict[str, Any] | None, pl.DataFrame | None, dict[str, Any] | None]:
    """``(summary, the channel's profile rows (timestep descending), its channels.parquet row)`` for a card.

    ``(None, None, None)`` where the stage has not run; ``(summary, None, None)`` for a one-half capture.
    """
    out = Path(out_dir)
    summary = read_cfg_contrast(out)
    if summary is None or summary.get("halves") != 2:
        return summary, None, None
    profile = pl.scan_parquet(out / PROFILES_FILE).filter(pl.col("channel") == channel).collect()
    rows = pl.scan_parquet(out / CHANNELS_FILE).filter(pl.col("channel") == channel).collect().to_dicts()
    return summary, profile, rows[0] if rows else None


def contrast_sentence(summary: dict[str, Any] | None, row: dict[str, Any] | None) -> str:
    """One plain-text sentence for the feature card (shown as text, never Markdown)."""
    if summary is None:
        return "Conditional vs unconditional: not computed (materialize cfg_contrast)."
    if summary.get("halves") != 2:
        return f"Conditional vs unconditional: one half only - {summary.get('reason')}."
    if row is None:
        return "Conditional vs unconditional: this channel is not in the table."

    def num(value: Any) -> str:
        return "n/a" if value is None or not np.isfinite(value) else f"{value:.3g}"

    share = row.get("text_share")
    share_text = "" if share is None or not np.isfinite(share) else f" ({share:+.0%} of its conditional activity)"
    return (f"Conditional vs unconditional ({row['verdict']}): the prompt changes the mean activation by "
            f"{num(row['difference'])}{share_text}, {summary['confidence']:.0%} interval "
            f"[{num(row['ci_low'])}, {num(row['ci_high'])}] over {row['n_prompts']} prompts, "
            f"p {num(row['p_value'])}, q {num(row['q_value'])} (BH over {summary['width']} channels).")
