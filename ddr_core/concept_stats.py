"""Nulls, p-values and intervals for concept scores (pure statistics, no I/O).

The unit of sampling is the **prompt**: a capture draws several images per prompt, so a channel's top
examples cluster by prompt and labels (which belong to prompts) are not independent across examples.
Every null here therefore permutes labels among prompts, and the scores it applies to count each prompt
once (a channel's top examples are de-duplicated by prompt before scoring).

- :func:`max_count_tail` / :func:`expected_purity`: the exact null of *purity* (the share of a channel's
  ``k`` distinct top prompts that hold the most common value of a family) when the ``k`` prompts are a
  uniformly random ``k``-subset of the labelled prompts: a multivariate hypergeometric draw, whose maximum
  count is computed exactly by a polynomial over the values (big integers, no Monte Carlo).
- :func:`benjamini_hochberg`: the FDR-adjusted q-values across every (channel, family) test of a variant
  (scipy's ``false_discovery_control``).
- :func:`agreement_permutation_test`: does a visualisation show its channel's concept more often than a
  visualisation of *another* channel would? Channel labels are permuted among channels (each
  visualisation keeps its images, their predictions keep their dependence); per-image chance is the rate
  at which a random image of the same source is predicted as the channel's value.
- :func:`bootstrap_interval` / :func:`bootstrap_difference`: percentile intervals over independent units
  (channels; a channel's images stay together).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import numpy as np


def _bounded_subsets(counts: Sequence[int], k: int, bound: int) -> int:
    """Number of ``k``-subsets of a pool with ``counts[v]`` items of value ``v`` that take at most
    ``bound`` items of every value (coefficient of x^k in prod_v sum_{c<=bound} C(n_v, c) x^c)."""
    ways = [1] + [0] * k
    for n in counts:
        top = min(n, bound)
        terms = [math.comb(n, c) for c in range(top + 1)]
        new = [0] * (k + 1)
        for size, count in enumerate(ways):
            if count:
                for c, term in enumerate(terms):
                    if size + c > k:
                        break
                    new[size + c] += count * term
        ways = new
    return ways[k]


def max_count_tail(counts: Sequence[int], k: int, observed: int) -> float:
    """Exact ``P(max_v count_v >= observed)`` when ``k`` items are drawn without replacement from a pool
    with ``counts[v]`` items of value ``v`` (the purity p-value of a channel whose ``k`` distinct top
    prompts hold ``observed`` of their most common value).

    Raises:
        ValueError: ``k`` larger than the pool, or a negative count.
    """
    counts = [int(n) for n in counts if n]
    if any(n < 0 for n in counts):
        raise ValueError(f"counts must be >= 0, got {counts}")
    total = sum(counts)
    if k < 1 or k > total:
        raise ValueError(f"cannot draw k={k} items from a pool of {total}")
    if observed <= math.ceil(k / max(len(counts), 1)):  # the maximum is always at least this large
        return 1.0
    below = _bounded_subsets(counts, k, observed - 1)
    return float(1 - Fraction(below, math.comb(total, k)))


def expected_purity(counts: Sequence[int], k: int) -> float:
    """Exact expected purity (``E[max count] / k``) of ``k`` items drawn without replacement from the pool:
    the chance level a channel that ignores the family would score with ``k`` distinct prompts."""
    counts = [int(n) for n in counts if n]
    total = sum(counts)
    if k < 1 or k > total:
        raise ValueError(f"cannot draw k={k} items from a pool of {total}")
    all_subsets = math.comb(total, k)
    expectation = Fraction(0)
    for m in range(1, k + 1):  # E[max] = sum_{m>=1} P(max >= m)
        expectation += 1 - Fraction(_bounded_subsets(counts, k, m - 1), all_subsets)
    return float(expectation / k)


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values (NaN stays NaN and takes no part in the correction)."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    finite = ~np.isnan(p)
    if finite.any():
        q[finite] = false_discovery_control(p[finite], method="bh")
    return q


def agreement_permutation_test(
    predictions: Sequence[Sequence[str]], targets: Sequence[str | None], *, strata: Sequence[str] | None = None,
    reference: dict[str, Sequence[str]] | None = None, permutations: int = 10000, seed: int = 0,
) -> dict[str, float]:
    """Is each unit's visualisation predicted as *its* target value more often than as another unit's target?

    A unit is a channel (or a channel x family pair): its images' predicted values and the value it stands
    for. Targets are permuted among units (within a stratum, e.g. a concept family, when ``strata`` is
    given); each unit keeps its images, so their dependence stays.

    Args:
        predictions: per unit, the predicted values of its images.
        targets: per unit, the value it stands for (``None``: left out).
        strata: per unit, its stratum (targets are permuted and chance is counted within it).
        reference: per stratum, every image's predicted value the per-image chance is counted over (e.g.
            all the source's images, when the units are a chosen subset); default: the units' images.
        permutations: target permutations for the p-value.

    Returns:
        ``rate`` (mean over units of the share of their images predicted as their target),
        ``chance_per_image`` (mean over units of the share of *all* images of their stratum predicted as
        their target), ``p_value`` (one-sided, ``(1 + #perm >= observed) / (1 + permutations)``: its
        resolution is ``1 / (permutations + 1)``, and among ``n`` units it cannot go below the share of
        permutations that reach the observed rate by chance), ``p_floor`` (the smallest p-value the exact test
        can give on these units whatever their images show: 1 / the number of distinct arrangements of the
        targets within their strata (:func:`target_arrangements`), e.g. 1/12 for the targets ``[circle, square,
        square]`` and ``[black, black, black, white]`` in two strata; units sharing one target value add no
        arrangements, so a claim that needs p < 0.001 is out of reach while ``p_floor`` is above it), ``units``,
        ``images``.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction lists for {len(targets)} targets")
    strata = list(strata) if strata is not None else [""] * len(targets)
    kept = [(list(p), t, g) for p, t, g in zip(predictions, targets, strata, strict=True) if len(p) and t is not None]
    if not kept:
        return {"rate": float("nan"), "chance_per_image": float("nan"), "p_value": float("nan"),
                "p_floor": float("nan"), "units": 0, "images": 0}
    values = sorted({(g, v) for p, t, g in kept for v in (*p, t)})
    code = {v: i for i, v in enumerate(values)}
    share = np.zeros((len(kept), len(values)))  # share[u, v]: the share of unit u's images predicted as v
    counts = np.zeros(len(values))
    for row, (predicted, _, stratum) in enumerate(kept):
        codes = [code[(stratum, v)] for v in predicted]
        np.add.at(share[row], codes, 1.0 / len(predicted))
        np.add.at(counts, codes, 1.0)
    stratum_total = {g: sum(len(p) for p, _, h in kept if h == g) for _, _, g in kept}
    target_codes = np.array([code[(g, t)] for _, t, g in kept])
    rows = np.arange(len(kept))
    observed = float(share[rows, target_codes].mean())
    if reference is not None:
        chance = float(np.mean([sum(v == t for v in reference[g]) / len(reference[g]) for _, t, g in kept]))
    else:
        chance = float(np.mean([counts[code[(g, t)]] / stratum_total[g] for _, t, g in kept]))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(np.asarray([g == name for _, _, g in kept])) for name in sorted(set(stratum_total))]
    shuffled = np.tile(target_codes, (permutations, 1))
    for members in groups:
        shuffled[:, members] = rng.permuted(np.tile(target_codes[members], (permutations, 1)), axis=1)
    null = share[rows[None, :], shuffled].mean(axis=1)
    exceed = int((null >= observed - 1e-12).sum())
    return {"rate": observed, "chance_per_image": chance, "p_value": (1 + exceed) / (1 + permutations),
            "p_floor": 1.0 / target_arrangements([t for _, t, _ in kept], [g for _, _, g in kept]),
            "units": len(kept), "images": int(sum(len(p) for p, _, _ in kept))}


def target_arrangements(targets: Sequence[str], strata: Sequence[str]) -> int:
    """How many distinct ways ``targets`` can be arranged over their units when they are permuted within
    ``strata`` (per stratum the multinomial ``n! / prod(count_v!)`` of its target values; the product over
    strata): the exact permutation test of :func:`agreement_permutation_test` cannot give a p-value below
    ``1 / target_arrangements(...)``."""
    total = 1
    for stratum in sorted(set(strata)):
        values = Counter(t for t, g in zip(targets, strata, strict=True) if g == stratum)
        count = math.factorial(sum(values.values()))
        for n in values.values():
            count //= math.factorial(n)
        total *= count
    return total


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of independent ``values`` (NaN dropped); ``(nan, nan)`` with fewer
    than two values."""
    data = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if len(data) < 2:
        return float("nan"), float("nan")
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    from scipy.stats import bootstrap

    result = bootstrap((data,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def bootstrap_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                         seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``mean(a) - mean(b)`` for two independent samples (each resampled alone)."""
    x = np.asarray([v for v in a if v is not None and not np.isnan(v)], dtype=float)
    y = np.asarray([v for v in b if v is not None and not np.isnan(v)], dtype=float)
    if len(x) < 2 or len(y) < 2:
        return float("nan"), float("nan")
    from scipy.stats import bootstrap

    result = bootstrap((x, y), lambda u, v, axis=-1: u.mean(axis=axis) - v.mean(axis=axis), confidence_level=level,
                       n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed),
                       paired=False, vectorized=True)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
