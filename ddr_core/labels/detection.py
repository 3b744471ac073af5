"""The detection score of a label: does it pick a feature's held-out activating images out of held-out
non-activating ones? Balanced accuracy with a prompt-permutation null and a prompt bootstrap interval.

Units are **prompts** (one image each: the prompt's best generation for the feature), because a capture's
examples cluster by prompt; the labelling half and the held-out half are split by prompt
(:func:`split_by_prompt`), so no prompt is both labelled and scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CHANCE = 0.5
"""The balanced accuracy of a label unrelated to the feature (whatever the share of positives)."""


def balanced_accuracy(predicted: Sequence[bool], positive: Sequence[bool]) -> float:
    """``(TPR + TNR) / 2``: the mean of the share of positives predicted positive and the share of negatives
    predicted negative. NaN when either class is empty.

    Raises:
        ValueError: the two sequences differ in length.
    """
    pred = np.asarray(predicted, dtype=bool)
    pos = np.asarray(positive, dtype=bool)
    if pred.shape != pos.shape:
        raise ValueError(f"{pred.size} predictions for {pos.size} truths")
    if not pos.any() or pos.all():
        return float("nan")
    return float((pred[pos].mean() + (~pred[~pos]).mean()) / 2)


def split_by_prompt(prompts: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """The distinct ``prompts`` shuffled (seeded) and cut in two: ``(labelling half, held-out half)``; with an odd
    count the held-out half gets the extra prompt. Every image of a prompt lands in the same half."""
    distinct = sorted(set(prompts))
    order = np.random.default_rng(seed).permutation(len(distinct))
    shuffled = [distinct[i] for i in order]
    cut = len(shuffled) // 2
    return shuffled[:cut], shuffled[cut:]


def permutation_p_value(predicted: Sequence[bool], positive: Sequence[bool]) -> float:
    """Exact one-sided p-value of the balanced accuracy when the truth labels are permuted among the prompts.

    With the predictions fixed, a permutation changes only ``X``, the positives among the ``m`` prompts predicted
    positive, and the balanced accuracy ``(X / n_pos + (n_neg - m + X) / n_neg) / 2`` grows with ``X``; ``X`` is
    hypergeometric (``n_pos`` positives among ``N`` prompts, ``m`` drawn), so ``p = P(X >= x_observed)`` exactly
    (p-values as small as ``1 / C(N, n_pos)`` resolve, which a Benjamini-Hochberg correction over many features
    needs). NaN when either class is empty.
    """
    from scipy.stats import hypergeom

    pred = np.asarray(predicted, dtype=bool)
    pos = np.asarray(positive, dtype=bool)
    if not pos.any() or pos.all():
        return float("nan")
    observed = int((pred & pos).sum())
    return float(hypergeom.sf(observed - 1, pos.size, int(pos.sum()), int(pred.sum())))


def detection_test(predicted: Sequence[bool], positive: Sequence[bool], *, resamples: int = 1000,
                   level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The balanced accuracy of ``predicted`` against ``positive`` (one entry per held-out prompt), with

    - ``p_value``: :func:`permutation_p_value` (truth labels permuted among the prompts: a label unrelated to the
      feature scores 0.5 on average);
    - ``interval``: percentile bootstrap interval, positives and negatives resampled separately (prompts with
      replacement, each class keeps its size).

    NaN score, p-value and interval when either class is empty.
    """
    pred = np.asarray(predicted, dtype=bool)
    pos = np.asarray(positive, dtype=bool)
    score = balanced_accuracy(pred, pos)
    out: dict[str, Any] = {"score": score, "chance": CHANCE, "n_positive": int(pos.sum()),
                           "n_negative": int((~pos).sum()), "tpr": float("nan"), "tnr": float("nan"),
                           "p_value": float("nan"), "interval": (float("nan"), float("nan"))}
    if math.isnan(score):
        return out
    out["tpr"], out["tnr"] = float(pred[pos].mean()), float((~pred[~pos]).mean())
    out["p_value"] = permutation_p_value(pred, pos)
    rng = np.random.default_rng(seed)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    hits_pos, hits_neg = pred[pos].astype(float), (~pred[~pos]).astype(float)
    boot_pos = hits_pos[rng.integers(0, n_pos, size=(resamples, n_pos))].mean(axis=1)
    boot_neg = hits_neg[rng.integers(0, n_neg, size=(resamples, n_neg))].mean(axis=1)
    boot = (boot_pos + boot_neg) / 2
    tail = (1 - level) / 2 * 100
    out["interval"] = (float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail)))
    return out


def choose_negatives(ranked: Sequence[str], activations: Sequence[float], positives: Sequence[str], n: int, *,
                     quantile: float, hard_share: float, seed: int,
                     hard_candidates: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(hard, easy)`` negative prompts of a feature: from the prompts ranked after ``positives`` whose activation
    is at most the ``quantile`` of the feature's per-prompt activations (clearly not activating), ``n`` in all.

    Hard ones (``round(hard_share * n)``): those of ``hard_candidates`` in that pool (e.g. prompts sharing all but
    one concept value with a positive), else the pool's highest activators ("high but not top"); the rest are
    drawn at random (seeded) from what is left. Fewer when the pool is smaller.
    """
    values = np.asarray(activations, dtype=float)
    if len(ranked) != len(values):
        raise ValueError(f"{len(ranked)} ranked prompts for {len(values)} activations")
    if not len(values):
        return [], []
    cut = float(np.quantile(values, quantile))
    taken = set(positives)
    pool = [p for p, a in zip(ranked, values, strict=True) if a <= cut and p not in taken]  # in rank order
    n_hard = min(round(hard_share * n), len(pool))
    if hard_candidates is not None:
        wanted = set(hard_candidates)
        hard = [p for p in pool if p in wanted][:n_hard]
    else:
        hard = pool[:n_hard]
    rest = [p for p in pool if p not in set(hard)]
    rng = np.random.default_rng(seed)
    easy = [rest[i] for i in sorted(rng.choice(len(rest), size=min(n - len(hard), len(rest)), replace=False))]
    return hard, easy
