"""Is a selective channel's text effect about its own concept? ``cfg_contrast`` scored against the toy world.

``cfg_contrast`` measures, per channel and prompt, the prompt's effect on the channel (conditional minus
unconditional CFG half, averaged over the prompt's images and the timesteps: ``d[p, c]``). Where the truth is
known (the toy world's labelled prompts) and ``feature_concepts`` found a channel significantly selective for a
concept value (say ``colour=red``), the text that names that value should move the channel more than text that
does not, if the channel reads the text at all. Per selective (channel, family, value) pair::

    z[p, c]      = d[p, c] standardised over the prompts (mean 0, sd 1 per channel)
    effect(pair) = mean z over the prompts naming the value - mean z over the others

and the pooled figure is the mean over pairs (per family too). Its null permutes the prompts' label rows among
the prompts (the prompt is the unit: its images share the text, and ``d`` is already one value per prompt), so the
p-value (two-sided, ``+1`` corrected) and the null mean respect the data's structure; the interval is a
percentile bootstrap over prompts. ``positive_share`` is the share of pairs with a positive effect (chance 0.5
under the null).

What it can and cannot say: a positive effect means the prompt's words for the concept drive the channel beyond
what the image (shared by both halves) does; zero means the channel's selectivity comes through the image. The
pairs come from ``feature_concepts``' top examples (read on the conditional half), so the test is not independent
of the selection: read it as "is the selectivity text-borne", not as a second selectivity test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.cfg_contrast import PROMPT_EFFECTS_FILE


def concept_pairs(concepts: Mapping[int, str | None]) -> list[tuple[int, str, str]]:
    """``[(channel, family, value)]`` from ``feature_concepts``' ``concept`` column (``"colour=red, shape=circle"``;
    empty / null: not selective)."""
    pairs = []
    for channel, text in sorted(concepts.items()):
        for part in (text or "").split(","):
            family, sep, value = part.strip().partition("=")
            if sep and family and value:
                pairs.append((int(channel), family, value))
    return pairs


def _pair_effects(z: np.ndarray, indicator: np.ndarray) -> np.ndarray:
    """Per pair: mean of ``z`` (prompts, pairs) where ``indicator`` (prompts, pairs) is 1 minus where it is 0;
    NaN for a pair with no prompt on one side."""
    inside = indicator.sum(axis=0)
    outside = indicator.shape[0] - inside
    with np.errstate(divide="ignore", invalid="ignore"):
        return (z * indicator).sum(axis=0) / inside - (z * (1 - indicator)).sum(axis=0) / outside


def concept_text_effect(effects: np.ndarray, labels: pl.DataFrame, pairs: Sequence[tuple[int, str, str]], *,
                        permutations: int = 2000, bootstraps: int = 2000, confidence: float = 0.95,
                        seed: int = 0) -> dict[str, Any]:
    """Score the selective pairs' text effect against prompts permuted among their labels.

    Args:
        effects: ``(prompts, channels)`` per-prompt effects ``d`` of ``cfg_contrast``, rows aligned with ``labels``.
        labels: one row per prompt, one string column per concept family (null: unknown).
        pairs: ``(channel, family, value)`` to score (from :func:`concept_pairs`).

    Returns:
        ``{"n_prompts", "n_pairs", "effect", "interval", "p_value", "null_mean", "positive_share", "families":
        {family: the same figures over that family's pairs}}``; ``effect`` is ``None`` where no pair can be scored.
    """
    effects = np.asarray(effects, dtype=np.float64)
    if effects.ndim != 2 or effects.shape[0] != labels.height:
        raise ValueError(f"effects of shape {effects.shape} do not match {labels.height} labelled prompts")
    sd = effects.std(axis=0, ddof=1) if effects.shape[0] > 1 else np.zeros(effects.shape[1])
    usable = [(c, f, v) for c, f, v in pairs if f in labels.columns and 0 <= c < effects.shape[1] and sd[c] > 0]
    columns = {f: np.asarray(labels[f].to_list(), dtype=object) for f in {f for _, f, _ in usable}}
    indicator = np.stack([columns[f] == v for _, f, v in usable], axis=1).astype(np.float64) if usable \
        else np.zeros((effects.shape[0], 0))
    keep = (indicator.sum(axis=0) > 0) & (indicator.sum(axis=0) < effects.shape[0])
    usable = [pair for pair, k in zip(usable, keep, strict=True) if k]
    indicator = indicator[:, keep]
    result: dict[str, Any] = {"n_prompts": int(effects.shape[0]), "n_pairs": len(usable), "effect": None,
                              "interval": [None, None], "p_value": None, "null_mean": None,
                              "positive_share": None, "families": {}, "confidence": confidence,
                              "permutations": permutations}
    if not usable:
        return result
    z = (effects - effects.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    z_pairs = z[:, [c for c, _, _ in usable]]
    observed = _pair_effects(z_pairs, indicator)
    rng = np.random.default_rng(seed)
    n = effects.shape[0]
    null = np.stack([_pair_effects(z_pairs, indicator[rng.permutation(n)]) for _ in range(permutations)])
    boot = np.stack([_pair_effects(z_pairs[rows], indicator[rows])
                     for rows in (rng.integers(0, n, n) for _ in range(bootstraps))])
    tail = (1 - confidence) / 2
    family_of = np.array([f for _, f, _ in usable])

    def scored(mask: np.ndarray) -> dict[str, Any]:
        value = float(observed[mask].mean())
        null_means = null[:, mask].mean(axis=1)
        with np.errstate(invalid="ignore"):
            boot_means = np.nanmean(boot[:, mask], axis=1)
        boot_means = boot_means[np.isfinite(boot_means)]
        return {"n_pairs": int(mask.sum()), "effect": value,
                "interval": [float(np.quantile(boot_means, tail)), float(np.quantile(boot_means, 1 - tail))]
                if boot_means.size else [None, None],
                "p_value": float((1 + np.sum(np.abs(null_means) >= abs(value) - 1e-12)) / (1 + permutations)),
                "null_mean": float(null_means.mean()), "positive_share": float((observed[mask] > 0).mean())}

    result.update(scored(np.ones(len(usable), dtype=bool)))
    result["families"] = {family: scored(family_of == family) for family in sorted(set(family_of))}
    return result


def read_prompt_effects(cfg_contrast_dir: str | Path) -> pl.DataFrame | None:
    """``prompt_index``, ``prompt``, ``effect`` (array) of a two-half ``cfg_contrast`` result; ``None`` if absent
    (a one-half capture, or a result written before the file existed: re-run ``cfg_contrast``)."""
    path = Path(cfg_contrast_dir) / PROMPT_EFFECTS_FILE
    return pl.read_parquet(path) if path.is_file() else None


def cfg_truth_for_variant(project: Any, layout: Any, variant: str, **options: Any) -> dict[str, Any] | None:
    """:func:`concept_text_effect` of ``variant`` from its ``cfg_contrast`` and ``feature_concepts`` outputs and
    its prompt dataset's labels; ``None`` where one of them is missing (the variant is not labelled, a stage has
    not run, or the capture has one CFG half)."""
    from ddr_core.feature_concepts import feature_concepts_dir, prompt_labels, read_feature_concepts
    from ddr_core.paths import file_inside

    spec = project.variants[variant]
    dataset = project.prompt_datasets[spec.prompts]
    found = read_feature_concepts(feature_concepts_dir(layout, variant))
    effects = read_prompt_effects(layout.stage_dir("cfg_contrast", variant))
    if dataset.labels is None or found is None or effects is None or effects.height == 0:
        return None
    labels = prompt_labels(file_inside(layout.prompts_dir(spec.prompts), dataset.file,
                                       f"prompt_datasets.{spec.prompts}.file"), dataset.labels, dataset.text_field)
    joined = effects.with_columns(pl.col("prompt").str.strip_chars()).join(labels, on="prompt", how="inner",
                                                                          maintain_order="left")
    concepts = {int(c): v for c, v in found[0].select("channel", "concept").iter_rows()}
    matrix = np.stack(joined["effect"].to_numpy()) if joined.height else np.zeros((0, 0))
    result = concept_text_effect(matrix, joined.select(list(dataset.labels.families)), concept_pairs(concepts),
                                 **options)
    return {"variant": variant, **result}


def cfg_truth_lines(project: Any, layout: Any, variants: Sequence[str]) -> list[str]:
    """The demo's lines: per labelled variant, the selective channels' text effect on their own concept."""
    def num(value: Any, fmt: str = "+.2f") -> str:
        return "-" if value is None else format(value, fmt)

    lines = []
    for variant in variants:
        if variant not in project.variants:
            continue
        found = cfg_truth_for_variant(project, layout, variant)
        if found is None or not found["n_pairs"]:
            continue
        low, high = found["interval"]
        families = "; ".join(f"{f} {num(v['effect'])} [{num(v['interval'][0])}, {num(v['interval'][1])}] p "
                             f"{num(v['p_value'], '.2g')} ({v['n_pairs']})" for f, v in found["families"].items())
        lines.append(f"  {variant}: {num(found['effect'])} sd [{num(low)}, {num(high)}] over {found['n_pairs']} "
                     f"selective channel x concept pairs (null {num(found['null_mean'])}, p "
                     f"{num(found['p_value'], '.2g')}); positive in {num(found['positive_share'], '.2f')} "
                     f"(chance 0.50); by family (uncorrected): {families}")
    if lines:
        lines.insert(0, "Text vs image on the truth (cfg_contrast: the prompt's effect on prompts naming a selective "
                        "channel's concept minus other prompts, in sd of the channel's prompt effects; prompts "
                        "permuted; [95% bootstrap over prompts]):")
    return lines
