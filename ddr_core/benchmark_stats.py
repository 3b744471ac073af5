"""Statistics of the visual benchmark (:mod:`ddr_core.visual_benchmark`), with answers known by hand
(tests/test_visual_benchmark.py): a bootstrap that resamples whole channels, an exact / Monte Carlo sign-flip
test over channels, and the pairwise pixel distance of images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[Any], *, level: float = 0.95,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` when whole clusters (channels) are resampled with
    replacement (a resample's mean is over every value of the clusters drawn). ``(nan, nan)`` with fewer than
    two clusters; NaN values are dropped."""
    pairs = [(float(v), c) for v, c in zip(values, clusters, strict=True) if v is not None and not math.isnan(v)]
    names = sorted({c for _, c in pairs}, key=str)
    if len(names) < 2:
        return float("nan"), float("nan")
    index = {c: i for i, c in enumerate(names)}
    sums, counts = np.zeros(len(names)), np.zeros(len(names))
    for value, cluster in pairs:
        sums[index[cluster]] += value
        counts[index[cluster]] += 1
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def sign_flip_test(values: Sequence[float], *, permutations: int = 10000, seed: int = 0) -> float:
    """One-sided p-value of ``mean(values) > 0`` for independent units (channels) symmetric about 0 under the
    null: exact over every sign vector when ``2**n <= permutations`` (n positive distinct values: ``2**-n``),
    else ``(1 + #flips >= observed) / (1 + permutations)``. NaN without values."""
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if data.size == 0:
        return float("nan")
    observed = data.mean() - 1e-12 * max(1.0, abs(data.mean()))
    if 2 ** data.size <= permutations:
        signs = 1 - 2 * ((np.arange(2 ** data.size)[:, None] >> np.arange(data.size)) & 1)
        return float(((signs * data).mean(axis=1) >= observed).mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(permutations, data.size))
    return float((1 + ((signs * data).mean(axis=1) >= observed).sum()) / (1 + permutations))


def pairwise_rmse(images: Sequence[np.ndarray]) -> list[float]:
    """RMSE (pixels scaled to 0-1) of every pair of same-shaped images."""
    arrays = [np.asarray(image, dtype=np.float64) / 255.0 for image in images]
    return [float(np.sqrt(np.mean((a - b) ** 2))) for a, b in combinations(arrays, 2) if a.shape == b.shape]
