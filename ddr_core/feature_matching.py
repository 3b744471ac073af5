"""Match the features of two variants: which feature of A is which feature of B, and which have no match at all.

Two variants (two models captured on the same prompts and seeds, e.g. SD v1.4 and its Style50 finetune; a layer's
raw channels and an SAE's features; two SAEs) are compared in two ways:

- **activation correlation** (:func:`match_activations`): over the same captured generations (same prompt, same
  seed, same recorded timesteps in both), each feature's spatial-mean activation at every (generation, timestep)
  is one sample. Each feature is centred per timestep first (the mean over generations at that timestep is
  removed), so two features that merely share the denoising schedule's trend do not correlate; what is left is
  how the feature varies with the content. The score of a pair is Pearson's ``r`` (``absolute=True``: ``|r|``,
  the sign reported beside it; it also pairs a feature with its complement, e.g. "yellow" with "not yellow").
- **direction similarity** (:func:`match_directions`): where both variants' units are directions in one space (an
  SAE's decoder rows and the layer's raw channel unit vectors; two SAEs of one layer), the ``|cosine|`` of every
  pair.

Each feature's **best match** is the other side's feature of highest score; the **Hungarian** assignment
(:func:`hungarian_pairs`) pairs them one to one (``min(Fa, Fb)`` pairs maximising the summed score).

**The null: what "no match" means.** A best-match score is compared with the best-match scores the same feature
reaches when B's generations are *prompt-shuffled*: B's prompts are permuted as whole blocks (every generation
and timestep of prompt ``p`` of B is paired with prompt ``pi(p)`` of A), which keeps each side's own structure
(timestep trends, the clustering of a prompt's generations) and destroys only the correspondence between the two
sides. Over ``n_permutations`` shuffles each feature has a null distribution of best-match scores; its p-value is
``(1 + #{null >= observed}) / (1 + n_permutations)``, BH-adjusted over the side's features. A score beyond every
shuffle gets the smaller tail probability of a Gumbel distribution fitted (by moments) to that feature's null
maxima (a tail approximation: with F features BH needs p-values far below ``1 / (n + 1)``, e.g. an SAE of 20480
features). A feature is
**matched** when ``q < alpha``; otherwise it has **no match better than chance**: ``vanished`` for a feature of
A, ``appeared`` for one of B. A feature with no variance in the captures is ``silent`` (it cannot be compared).
The direction null is analogous: the best ``|cosine|`` of uniformly random unit vectors against the other side's
directions (:func:`random_direction_null`).

Everything here is NumPy / SciPy on in-memory arrays; :mod:`ddr_core.feature_matching_stage` reads them from two
variants' activation stores and writes the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FEATURE_MATCHING_VERSION = "1"
MATCHED, VANISHED, APPEARED, SILENT = "matched", "vanished", "appeared", "silent"


class MatchingConfig(BaseModel):
    """Settings of a feature matching (run config of ``feature_matches``; a comparison's ``options`` in the
    project config set its defaults)."""

    model_config = ConfigDict(extra="forbid")

    n_permutations: int = Field(200, ge=19, le=10_000,
                                description="prompt shuffles of the null (p-values resolve 1 / (n + 1))")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="BH q below which a feature counts as matched")
    absolute: bool = Field(False, description="score pairs by |r| (a feature and its negation match); default r: "
                                              "|r| also matches a feature with its complement (docs/MATCHING.md)")
    center_timesteps: bool = Field(True, description="remove each feature's per-timestep mean before correlating")
    max_generations: int | None = Field(None, ge=2, description="use the first N shared generations (memory)")
    timestep_stride: int = Field(1, ge=1, description="use every k-th recorded timestep (memory)")
    seed: int = Field(0, description="seed of the prompt shuffles and the random-direction null")
    direction_null_draws: int = Field(1000, ge=19, le=100_000, description="random unit vectors of the direction null")
    table_rows: int = Field(20, ge=1, le=500, description="matched pairs shown in the Dagster metadata table")


def standardise(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, F)`` -> (z-scores ``(n, F)`` float64, ``(F,)`` bool: the column has variance). A constant column's
    z-scores are zeros (its correlation with anything is 0, and it is reported ``silent``)."""
    x = np.asarray(samples, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    std = x.std(axis=0)
    alive = std > 1e-12 * np.maximum(1.0, np.abs(x).max(axis=0, initial=0.0))
    z = np.zeros_like(x)
    z[:, alive] = x[:, alive] / std[alive]
    return z, alive


def center_per_timestep(activations: np.ndarray) -> np.ndarray:
    """``(g, T, F)`` -> the same with each (timestep, feature)'s mean over generations removed."""
    values = np.asarray(activations, dtype=np.float64)
    return values - values.mean(axis=0, keepdims=True)


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation ``(Fa, Fb)`` of the columns of ``a (n, Fa)`` and ``b (n, Fb)`` (0 for a constant column).

    Raises:
        ValueError: different sample counts, or fewer than 2 samples.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a has {a.shape[0]} samples and b {b.shape[0]}; correlate the same samples")
    if a.shape[0] < 2:
        raise ValueError(f"{a.shape[0]} samples: a correlation needs at least 2")
    za, _ = standardise(a)
    zb, _ = standardise(b)
    return za.T @ zb / a.shape[0]


def hungarian_pairs(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs ``(rows, cols)`` maximising the summed ``score (Fa, Fb)`` (``min(Fa, Fb)`` pairs)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.nan_to_num(np.asarray(score, dtype=np.float64)), maximize=True)
    return rows.astype(np.int64), cols.astype(np.int64)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values of ``p_values`` (NaN stays NaN, and is left out of the count)."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order] * ok.size / np.arange(1, ok.size + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q


def block_permutation(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the samples that moves whole groups (prompts): group blocks of equal size are shuffled
    among themselves, each block's inner order kept. ``groups (g,)`` -> index ``(g,)``."""
    groups = np.asarray(groups)
    labels, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(labels.size)]
    index = np.arange(groups.size)
    by_size: dict[int, list[int]] = {}
    for k, rows in enumerate(members):
        by_size.setdefault(rows.size, []).append(k)
    for blocks in by_size.values():
        shuffled = rng.permutation(len(blocks))
        for target, source in zip(blocks, shuffled, strict=True):
            index[members[target]] = members[blocks[source]]
    return index


@dataclass
class SideResult:
    """One side's features against the other side: best match, its score and sign, the null and the verdict."""

    best: np.ndarray            # (F,) int64 index of the best match on the other side (-1: silent)
    score: np.ndarray           # (F,) best-match score (|r| or r)
    signed: np.ndarray          # (F,) the signed correlation of that pair
    null_threshold: np.ndarray  # (F,) the (1 - alpha) quantile of the feature's null best-match scores
    p_value: np.ndarray         # (F,)
    q_value: np.ndarray         # (F,)
    status: list[str]           # matched / vanished (A) or appeared (B) / silent


@dataclass
class MatchResult:
    """What :func:`match_activations` found (see the module docstring)."""

    correlation: np.ndarray          # (Fa, Fb) signed Pearson r
    a: SideResult
    b: SideResult
    hungarian: tuple[np.ndarray, np.ndarray]
    n_samples: int
    n_groups: int
    null_pooled_threshold: float     # (1 - alpha) quantile of every A feature's null best-match scores
    config: MatchingConfig = field(default_factory=MatchingConfig)


def _side(score: np.ndarray, signed: np.ndarray, null_best: np.ndarray, alive: np.ndarray, other_alive: np.ndarray,
          alpha: float, no_match: str) -> SideResult:
    """Verdicts of the rows of ``score (F, F_other)`` given their null best scores ``(P, F)``."""
    masked = np.where(other_alive[None, :], score, -np.inf)
    best = masked.argmax(axis=1) if masked.shape[1] else np.zeros(masked.shape[0], dtype=np.int64)
    observed = masked[np.arange(masked.shape[0]), best] if masked.shape[1] else np.full(masked.shape[0], -np.inf)
    usable = alive & np.isfinite(observed)
    exceed = (null_best >= observed[None, :] - 1e-12).sum(axis=0)
    p = (1.0 + exceed) / (1.0 + null_best.shape[0])
    # beyond every shuffle: the tail of a Gumbel fitted to the feature's null maxima (moments), never above 1/(n+1)
    beyond = exceed == 0
    if beyond.any():
        finite = np.where(np.isfinite(null_best), null_best, np.nan)
        scale = np.nanstd(finite, axis=0) * np.sqrt(6.0) / np.pi
        location = np.nanmean(finite, axis=0) - 0.5772156649 * scale
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            tail = -np.expm1(-np.exp(-(observed - location) / np.where(scale > 0, scale, np.nan)))
        p = np.where(beyond & np.isfinite(tail), np.minimum(p, np.maximum(tail, 1e-300)), p)
    p = np.where(usable, p, np.nan)
    q = benjamini_hochberg(p)
    status = [SILENT if not ok else (MATCHED if qi < alpha else no_match) for ok, qi in zip(usable, q, strict=True)]
    return SideResult(
        best=np.where(usable, best, -1).astype(np.int64),
        score=np.where(usable, observed, np.nan),
        signed=np.where(usable, signed[np.arange(signed.shape[0]), best] if signed.shape[1] else np.nan, np.nan),
        null_threshold=np.where(usable, np.quantile(null_best, 1.0 - alpha, axis=0), np.nan),
        p_value=p, q_value=q, status=status,
    )


def match_activations(a: np.ndarray, b: np.ndarray, groups: Sequence[int] | np.ndarray,
                      config: MatchingConfig = MatchingConfig()) -> MatchResult:
    """Match the features of ``a (g, T, Fa)`` with those of ``b (g, T, Fb)``: the same ``g`` generations (row ``i``
    of both is the same prompt and seed) at the same ``T`` timesteps; ``groups (g,)`` is each generation's prompt
    (the blocks the null shuffles). See the module docstring for the score, the null and the verdicts.

    Raises:
        ValueError: shapes that disagree, or fewer than 3 prompts (no null can be drawn).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim == 2:
        a, b = a[:, None, :], b[:, None, :]
    if a.ndim != 3 or b.ndim != 3 or a.shape[:2] != b.shape[:2]:
        raise ValueError(f"a {a.shape} and b {b.shape} must be (generations, timesteps, features) over the same "
                         "generations and timesteps")
    groups = np.asarray(groups)
    if groups.shape != (a.shape[0],):
        raise ValueError(f"groups has shape {groups.shape}; give one prompt index per generation ({a.shape[0]})")
    n_groups = int(np.unique(groups).size)
    if n_groups < 3:
        raise ValueError(f"{n_groups} prompt(s): the prompt-shuffle null needs at least 3 prompts")
    if config.center_timesteps and a.shape[1] > 1:
        a, b = center_per_timestep(a), center_per_timestep(b)
    g, t = a.shape[:2]
    za, alive_a = standardise(a.reshape(g * t, -1))
    zb, alive_b = standardise(b.reshape(g * t, -1))
    n = g * t
    correlation = za.T @ zb / n
    score = np.abs(correlation) if config.absolute else correlation
    rng = np.random.Generator(np.random.PCG64(config.seed))
    zb3 = zb.reshape(g, t, -1)
    null_a = np.empty((config.n_permutations, za.shape[1]))
    null_b = np.empty((config.n_permutations, zb.shape[1]))
    for k in range(config.n_permutations):
        shuffled = zb3[block_permutation(groups, rng)].reshape(n, -1)
        null = za.T @ shuffled / n
        null = np.abs(null) if config.absolute else null
        null_a[k] = np.where(alive_b[None, :], null, -np.inf).max(axis=1) if null.shape[1] else -np.inf
        null_b[k] = np.where(alive_a[:, None], null, -np.inf).max(axis=0) if null.shape[0] else -np.inf
    side_a = _side(score, correlation, null_a, alive_a, alive_b, config.alpha, VANISHED)
    side_b = _side(score.T, correlation.T, null_b, alive_b, alive_a, config.alpha, APPEARED)
    pooled = null_a[:, alive_a]
    return MatchResult(
        correlation=correlation, a=side_a, b=side_b,
        hungarian=hungarian_pairs(np.where(np.outer(alive_a, alive_b), score, 0.0)),
        n_samples=n, n_groups=n_groups,
        null_pooled_threshold=float(np.quantile(pooled, 1.0 - config.alpha)) if pooled.size else float("nan"),
        config=config,
    )


def unit_rows(directions: np.ndarray) -> np.ndarray:
    """``(F, C)`` -> rows scaled to unit length (a zero row stays zero)."""
    d = np.asarray(directions, dtype=np.float64)
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    return np.divide(d, norm, out=np.zeros_like(d), where=norm > 0)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(Fa, Fb)`` of the rows of ``a (Fa, C)`` and ``b (Fb, C)``.

    Raises:
        ValueError: the two live in spaces of different dimension.
    """
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"directions of {a.shape[1]} and {b.shape[1]} dimensions are not in one space")
    return unit_rows(a) @ unit_rows(b).T


def random_direction_null(b: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """Best ``|cosine|`` of ``draws`` uniformly random unit vectors against the rows of ``b (Fb, C)``: ``(draws,)``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    unit_b = unit_rows(b)
    best = np.empty(draws)
    for start in range(0, draws, 256):
        stop = min(start + 256, draws)
        random = unit_rows(rng.standard_normal((stop - start, b.shape[1])))
        best[start:stop] = np.abs(random @ unit_b.T).max(axis=1)
    return best


@dataclass
class DirectionResult:
    """What :func:`match_directions` found: best |cosine| each way, the Hungarian pairs and the random null."""

    cosine: np.ndarray        # (Fa, Fb)
    best_a: np.ndarray        # (Fa,) index in B
    score_a: np.ndarray       # (Fa,) best |cosine|
    best_b: np.ndarray        # (Fb,) index in A
    score_b: np.ndarray       # (Fb,)
    hungarian: tuple[np.ndarray, np.ndarray]
    null_threshold_a: float   # (1 - alpha) quantile of a random direction's best |cosine| against B
    null_threshold_b: float   # the same against A


def match_directions(a: np.ndarray, b: np.ndarray, alpha: float = 0.05, draws: int = 1000,
                     seed: int = 0) -> DirectionResult:
    """Best-matching directions of ``a (Fa, C)`` in ``b (Fb, C)`` and back by ``|cosine|``, the one-to-one pairs,
    and each side's threshold from random unit vectors (a score above it is more aligned than chance)."""
    cosine = cosine_matrix(a, b)
    score = np.abs(cosine)
    best_a = score.argmax(axis=1)
    best_b = score.argmax(axis=0)
    return DirectionResult(
        cosine=cosine, best_a=best_a, score_a=score[np.arange(score.shape[0]), best_a],
        best_b=best_b, score_b=score[best_b, np.arange(score.shape[1])],
        hungarian=hungarian_pairs(score),
        null_threshold_a=float(np.quantile(random_direction_null(b, draws, seed), 1.0 - alpha)),
        null_threshold_b=float(np.quantile(random_direction_null(a, draws, seed + 1), 1.0 - alpha)),
    )
