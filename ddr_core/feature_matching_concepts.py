"""Which concepts the features without a match stand for: the diff of two models read against ground truth.

When both variants' prompts carry concept labels (the toy world's colour / shape / background), every feature of
A gets, per concept value, a selectivity score over prompts (:func:`concept_selectivity`: its prompt-mean activity
on the prompts naming the value minus the others, in units of the spread of its prompt means; a one-sided
prompt-label permutation p-value, BH over features). :func:`concept_diff` then asks, per value: of the features of
A selective for it, how many have no match in B (``vanished``), against the share among A's other features - a
one-sided Fisher exact test, the expected count under chance and Wilson intervals, BH over the values. A concept
removed from B's training should be the one value whose selective features vanish more than chance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddr_core.feature_matching import SILENT, VANISHED, benjamini_hochberg


def prompt_means(activations: np.ndarray, groups: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(g, T, F)`` activations and each generation's prompt -> (prompt ids ``(P,)``, their mean activity
    ``(P, F)`` over the prompt's generations and every timestep)."""
    values = np.asarray(activations, dtype=np.float64)
    per_generation = values.mean(axis=1) if values.ndim == 3 else values
    groups = np.asarray(groups)
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((ids.size, per_generation.shape[1]))
    np.add.at(sums, inverse, per_generation)
    return ids, sums / np.bincount(inverse)[:, None]


def concept_selectivity(means: np.ndarray, has_value: np.ndarray, n_permutations: int = 2000,
                        seed: int = 0, two_sided: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selectivity of every feature for one concept value over prompts.

    Args:
        means: ``(P, F)`` prompt-mean activity.
        has_value: ``(P,)`` bool: the prompt names the value.

    Returns:
        ``(effect, p, q)`` each ``(F,)``: the standardised difference (mean on the value's prompts minus the rest,
        over the standard deviation of the prompt means; 0 for a constant feature), its permutation p-value
        (prompt labels shuffled; one-sided by default: the feature is *more* active on the value's prompts, so a
        "yellow" feature is not also called selective for "red" because it is quiet there) and the BH q.

    Raises:
        ValueError: a value named by no prompt or by every prompt.
    """
    means = np.asarray(means, dtype=np.float64)
    label = np.asarray(has_value, dtype=bool)
    k = int(label.sum())
    if k == 0 or k == label.size:
        raise ValueError(f"the value is named by {k} of {label.size} prompts; selectivity needs both kinds")
    spread = means.std(axis=0)
    scale = np.where(spread > 0, spread, 1.0)

    def effect_of(labels: np.ndarray) -> np.ndarray:  # (m, P) bool -> (m, F)
        inside = labels @ means / k
        outside = (~labels) @ means / (label.size - k)
        return (inside - outside) / scale

    observed = effect_of(label[None, :])[0]
    rng = np.random.Generator(np.random.PCG64(seed))
    exceed = np.zeros(means.shape[1])
    for start in range(0, n_permutations, 500):
        m = min(500, n_permutations - start)
        shuffled = np.array([rng.permutation(label) for _ in range(m)])
        null = effect_of(shuffled)
        if two_sided:
            exceed += (np.abs(null) >= np.abs(observed)[None, :] - 1e-12).sum(axis=0)
        else:
            exceed += (null >= observed[None, :] - 1e-12).sum(axis=0)
    p = (1.0 + exceed) / (1.0 + n_permutations)
    p = np.where(spread > 0, p, np.nan)
    return np.where(spread > 0, observed, 0.0), p, benjamini_hochberg(p)


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (``(nan, nan)`` for no trials)."""
    if trials == 0:
        return float("nan"), float("nan")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, round(centre - half, 12))), float(min(1.0, round(centre + half, 12)))


def _graded(scores: np.ndarray | None, selective: np.ndarray, others: np.ndarray) -> dict[str, float]:
    """Medians of the best-match scores of the selective features and of the others, and the one-sided
    Mann-Whitney p that the selective ones' are lower (NaN where a group is empty or no scores are given)."""
    if scores is None:
        return {}
    from scipy.stats import mannwhitneyu

    values = np.asarray(scores, dtype=np.float64)
    mine, rest = values[selective & np.isfinite(values)], values[others & np.isfinite(values)]
    p = float(mannwhitneyu(mine, rest, alternative="less").pvalue) if mine.size and rest.size else float("nan")
    return {"median_score": float(np.median(mine)) if mine.size else float("nan"),
            "median_score_others": float(np.median(rest)) if rest.size else float("nan"), "mannwhitney_p": p}


def concept_diff(status: Sequence[str], means: np.ndarray, prompt_labels: Sequence[Mapping[str, str]],
                 families: Mapping[str, Sequence[str]], alpha: float = 0.05, n_permutations: int = 2000,
                 seed: int = 0, scores: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per concept value: A's features selective for it and how many of them vanished, against chance.

    Args:
        status: each A feature's verdict (:data:`~ddr_core.feature_matching.MATCHED` / ``VANISHED`` / ``SILENT``).
        means: ``(P, F)`` A's prompt-mean activity.
        prompt_labels: ``P`` label dicts (family -> value), in the rows' order.
        families: family -> its values.
        scores: ``(F,)`` A's best-match scores: adds the graded test beside the verdicts' (``median_score``,
            ``median_score_others``, ``mannwhitney_p``: one-sided, the selective features' best matches are worse).

    Returns:
        One row per (family, value): ``n_selective`` (BH q < alpha and not silent), ``n_vanished`` of them,
        ``share_vanished`` with its Wilson interval, ``share_vanished_others`` (the comparable features not
        selective for it), ``expected_vanished`` (``n_selective`` times the overall vanished share: chance),
        ``fisher_p`` (one-sided: more vanish than among the others), ``fisher_q`` (BH over values), and
        ``selective_features`` / ``vanished_features`` (their indices).
    """
    from scipy.stats import fisher_exact

    status_arr = np.asarray(status)
    comparable = status_arr != SILENT
    vanished = status_arr == VANISHED
    overall = float(vanished[comparable].mean()) if comparable.any() else float("nan")
    rows: list[dict[str, Any]] = []
    for offset, (family, values) in enumerate(families.items()):
        for index, value in enumerate(values):
            has = np.array([labels.get(family) == value for labels in prompt_labels], dtype=bool)
            if not has.any() or has.all():
                continue
            effect, _, q = concept_selectivity(means, has, n_permutations, seed + 101 * offset + index)
            selective = comparable & (np.nan_to_num(q, nan=1.0) < alpha)
            others = comparable & ~selective
            a, b = int((selective & vanished).sum()), int((selective & ~vanished).sum())
            c, d = int((others & vanished).sum()), int((others & ~vanished).sum())
            p = float(fisher_exact([[a, b], [c, d]], alternative="greater").pvalue) if a + b and c + d else float("nan")
            low, high = wilson_interval(a, a + b)
            rows.append({
                "family": family, "value": value, "n_selective": a + b, "n_vanished": a,
                "share_vanished": a / (a + b) if a + b else float("nan"), "share_low": low, "share_high": high,
                "share_vanished_others": c / (c + d) if c + d else float("nan"),
                "expected_vanished": (a + b) * overall, "fisher_p": p,
                "selective_features": np.flatnonzero(selective).tolist(),
                "vanished_features": np.flatnonzero(selective & vanished).tolist(),
                "mean_effect_selective": float(effect[selective].mean()) if selective.any() else float("nan"),
                **_graded(scores, selective, others),
            })
    q = benjamini_hochberg(np.array([row["fisher_p"] for row in rows], dtype=np.float64))
    for row, value in zip(rows, q, strict=True):
        row["fisher_q"] = float(value)
    return rows
