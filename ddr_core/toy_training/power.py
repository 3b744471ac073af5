"""Power of the platform's concept statistics on a toy-world design, from synthetic labels (no model).

Before a richer toy world is trained, this asks whether the scores ``feature_concepts`` reports could detect
what the world is meant to show: (1) channels that are selective for a concept, at the platform's
false-discovery rate, and (2) a purity gap between SAE features and raw channels of a given size.

The simulation uses the platform's own statistics, unchanged (:mod:`ddr_core.concept_stats`): a unit's
top examples are de-duplicated by prompt (a prompt's best image stands for it), purity is the share of the
``n_examples`` distinct top prompts that hold a family's most common value, its p-value the exact
prompt-level null (:func:`~ddr_core.concept_stats.max_count_tail`), Benjamini-Hochberg over every
(unit, family) pair of a basis, and the SAE-minus-raw gap of mean purity with the percentile bootstrap the
``basis_gap`` report uses (:func:`~ddr_core.concept_stats.bootstrap_difference`).

The planted activations (one value per generation at the unit's peak, as ``peak_all_generations`` reads)::

    a[g, u] = effect * sum_{j in concepts(u)} x[prompt(g), j] + sigma_prompt * z[prompt(g), u] + sigma_image * e[g, u]

with ``x`` the prompt's one-hot concept values, ``z`` and ``e`` standard normal (``z`` is what makes a
prompt's images cluster). A unit is *null* (no concept), *monosemantic* (one family's value) or
*polysemantic* (``poly_degree`` values). By default a polysemantic unit's values belong to **one family**
("red or blue"): values of a family never occur together, so packing them into one direction costs a
model no interference, which makes them the superposition to expect in this world, and the one an SAE
can undo and purity can see. ``poly_mode="across"`` draws them from distinct families ("red or circle"):
an additive unit of that kind ranks the conjunction first and scores *high* purity in both families, so
mean purity cannot penalise it (the simulation shows this; docs/TOY_WORLD.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import product
from typing import Any, Literal

import numpy as np

from ddr_core.concept_stats import benjamini_hochberg, bootstrap_difference, expected_purity, max_count_tail


@dataclass(frozen=True)
class WorldDesign:
    """What a toy world and its capture offer the statistics.

    Attributes:
        name: A label for the report.
        families: Concept family -> number of values (prompts name one value of each family).
        prompts: Distinct prompts in the capture (a seeded random subset of the full product of the
            families' values; ``None``: every combination).
        images_per_prompt: Generations per prompt (seeds).
        width: Raw channels of the layer.
        sae_width: SAE features.
        n_examples: Distinct top prompts scored per unit (``FeatureConceptsConfig.n_examples``).
    """

    name: str
    families: dict[str, int]
    prompts: int | None
    images_per_prompt: int
    width: int = 64
    sae_width: int = 256
    n_examples: int = 10

    def __post_init__(self) -> None:
        if not self.families or any(n < 2 for n in self.families.values()):
            raise ValueError(f"families must name at least one family of >= 2 values, got {self.families}")
        if self.images_per_prompt < 1 or self.width < 1 or self.sae_width < 1 or self.n_examples < 1:
            raise ValueError("images_per_prompt, width, sae_width and n_examples must be >= 1")
        if self.prompts is not None and not self.n_examples <= self.prompts <= self.combinations:
            raise ValueError(f"prompts must be in [n_examples={self.n_examples}, {self.combinations}] "
                             f"(the combinations of {self.families}), got {self.prompts}")

    @property
    def combinations(self) -> int:
        return math.prod(self.families.values())

    @property
    def concept_values(self) -> int:
        return sum(self.families.values())

    @property
    def generations(self) -> int:
        return (self.prompts or self.combinations) * self.images_per_prompt


@dataclass(frozen=True)
class PlantedBasis:
    """The units of one basis (raw channels or SAE features) and how they respond.

    Attributes:
        share_selective: Share of units that respond to any concept (the rest are null).
        share_polysemantic: Among the responding units, the share that respond to ``poly_degree`` values.
        poly_degree: Values a polysemantic unit responds to.
        poly_mode: ``"within"``: the values belong to one family (of at least ``poly_degree`` values);
            ``"across"``: to distinct families.
        effect: Activation per concept value the unit responds to, in units of the noise scale.
        sigma_prompt: Prompt-level noise (shared by a prompt's images).
        sigma_image: Image-level noise.
    """

    share_selective: float
    share_polysemantic: float
    poly_degree: int = 2
    poly_mode: Literal["within", "across"] = "within"
    effect: float = 2.0
    sigma_prompt: float = 1.0
    sigma_image: float = 1.0

    def __post_init__(self) -> None:
        if not (0 <= self.share_selective <= 1 and 0 <= self.share_polysemantic <= 1):
            raise ValueError("share_selective and share_polysemantic must be in [0, 1]")
        if self.poly_degree < 2:
            raise ValueError(f"poly_degree must be >= 2, got {self.poly_degree}")


@dataclass
class _Pool:
    """The capture's prompts: label indices per family and the exact-null caches."""

    labels: np.ndarray  # (prompts, families) int
    onehot: np.ndarray  # (prompts, concept_values) float
    offsets: list[int]
    counts: list[list[int]]
    cache: dict[tuple[int, int, int], float] = field(default_factory=dict)

    def p_value(self, family: int, k: int, observed: int) -> float:
        key = (family, k, observed)
        if key not in self.cache:
            self.cache[key] = max_count_tail(self.counts[family], k, observed)
        return self.cache[key]


def _make_pool(design: WorldDesign, rng: np.random.Generator) -> _Pool:
    sizes = list(design.families.values())
    combos = np.asarray(list(product(*[range(n) for n in sizes])), dtype=np.int64)
    if design.prompts is not None and design.prompts < len(combos):
        combos = combos[np.sort(rng.choice(len(combos), size=design.prompts, replace=False))]
    offsets = list(np.cumsum([0, *sizes[:-1]]))
    onehot = np.zeros((len(combos), sum(sizes)))
    for f, offset in enumerate(offsets):
        onehot[np.arange(len(combos)), offset + combos[:, f]] = 1.0
    counts = [sorted(np.bincount(combos[:, f], minlength=n).tolist()) for f, n in enumerate(sizes)]
    return _Pool(labels=combos, onehot=onehot, offsets=offsets, counts=counts)


def _plant(design: WorldDesign, basis: PlantedBasis, units: int, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    """Weights ``(concept_values, units)``, the unit kinds (0 null, 1 mono, 2 poly) and planted (family, value)."""
    sizes = list(design.families.values())
    offsets = list(np.cumsum([0, *sizes[:-1]]))
    weights = np.zeros((sum(sizes), units))
    kinds = np.zeros(units, dtype=np.int64)
    planted: list[list[tuple[int, int]]] = []
    degree = min(basis.poly_degree, len(sizes)) if basis.poly_mode == "across" else basis.poly_degree
    wide = [f for f, n in enumerate(sizes) if n >= basis.poly_degree]
    for unit in range(units):
        chosen: list[tuple[int, int]] = []
        if rng.random() < basis.share_selective:
            poly = degree >= 2 and rng.random() < basis.share_polysemantic
            if poly and basis.poly_mode == "within" and wide:
                family = int(rng.choice(wide))
                chosen = [(family, int(v)) for v in rng.choice(sizes[family], size=degree, replace=False)]
            else:
                poly = poly and basis.poly_mode == "across"
                families = rng.choice(len(sizes), size=degree if poly else 1, replace=False)
                chosen = [(int(f), int(rng.integers(sizes[f]))) for f in families]
            kinds[unit] = 2 if poly else 1
            for f, v in chosen:
                weights[offsets[f] + v, unit] = basis.effect
        planted.append(chosen)
    return weights, kinds, planted


def score_basis(design: WorldDesign, basis: PlantedBasis, units: int, pool: _Pool, rng: np.random.Generator,
                alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Simulate one basis on ``pool`` and score it as ``feature_concepts`` does.

    Returns:
        ``kinds`` (units,), ``purity`` (units,) mean over families (the platform's ``purity``),
        ``best_excess`` (units,) the largest purity-minus-chance over families, ``detected`` (units,) bool: some family
        has ``q < alpha``, ``hit`` (units,) bool: a planted family has ``q < alpha`` and its dominant value is
        the planted one, ``false`` (units,) bool: some non-planted family has ``q < alpha``.
    """
    weights, kinds, planted = _plant(design, basis, units, rng)
    n_prompts, n_families = pool.labels.shape
    per_prompt = pool.onehot @ weights + basis.sigma_prompt * rng.standard_normal((n_prompts, units))
    images = per_prompt[:, None, :] + basis.sigma_image * rng.standard_normal(
        (n_prompts, design.images_per_prompt, units))
    best = images.max(axis=1)  # a prompt's best generation stands for it (top examples de-duplicated by prompt)
    k = min(design.n_examples, n_prompts)
    top = np.argsort(-best, axis=0, kind="stable")[:k]  # (k, units)
    p = np.ones((units, n_families))
    dominant = np.zeros((units, n_families), dtype=np.int64)
    purity = np.zeros(units)
    best_excess = np.zeros(units)
    chances = [expected_purity(counts, k) for counts in pool.counts]
    for u in range(units):
        shares = []
        for f in range(n_families):
            counts = np.bincount(pool.labels[top[:, u], f], minlength=design.families[list(design.families)[f]])
            dominant[u, f] = int(np.argmax(counts))
            shares.append(counts.max() / k)
            p[u, f] = pool.p_value(f, k, int(counts.max()))
        purity[u] = float(np.mean(shares))
        best_excess[u] = float(max(share - chance for share, chance in zip(shares, chances, strict=True)))
    q = benjamini_hochberg(p.reshape(-1)).reshape(p.shape)
    significant = q < alpha
    hit = np.zeros(units, dtype=bool)
    false = np.zeros(units, dtype=bool)
    for u in range(units):
        planted_values: dict[int, set[int]] = {}
        for f, v in planted[u]:
            planted_values.setdefault(f, set()).add(v)
        for f in range(n_families):
            if not significant[u, f]:
                continue
            if f in planted_values and dominant[u, f] in planted_values[f]:
                hit[u] = True
            elif f not in planted_values:
                false[u] = True
    return {"kinds": kinds, "purity": purity, "best_excess": best_excess, "detected": significant.any(axis=1),
            "hit": hit, "false": false}


def chance_purity(design: WorldDesign, seed: int = 0) -> float:
    """Exact mean chance purity (over families) of ``n_examples`` prompts drawn from the design's pool."""
    pool = _make_pool(design, np.random.default_rng(seed))
    k = min(design.n_examples, len(pool.labels))
    return float(np.mean([expected_purity(counts, k) for counts in pool.counts]))


def simulate_power(design: WorldDesign, raw: PlantedBasis, sae: PlantedBasis, *, repetitions: int = 20,
                   seed: int = 0, alpha: float = 0.05, bootstrap_resamples: int = 1000) -> dict[str, Any]:
    """Power of ``design`` over ``repetitions`` seeded worlds (each: a prompt pool, a raw and an SAE basis).

    Returns:
        The design and bases, the exact chance purity, and the mean over repetitions of: per basis the
        share of monosemantic / polysemantic units detected for a planted concept (``power_mono``,
        ``power_poly``), the share of null units with any discovery (``false_positive_null``), the share of
        discoveries that name no planted family (``false_discovery``), the mean purity; and the expected
        SAE-minus-raw purity gap with the share of repetitions whose 95% bootstrap interval lies above 0
        (``gap_power``) and its mean interval width; the same for the best family's purity excess
        (``best_gap``, ``best_gap_power``, ``best_gap_interval_width``).
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for rep in range(repetitions):
        pool = _make_pool(design, rng)
        results = {"raw": score_basis(design, raw, design.width, pool, rng, alpha),
                   "sae": score_basis(design, sae, design.sae_width, pool, rng, alpha)}
        for name, result in results.items():
            kinds = result["kinds"]
            for label, kind in (("mono", 1), ("poly", 2)):
                if (kinds == kind).any():
                    add(f"{name}_power_{label}", float(result["hit"][kinds == kind].mean()))
            if (kinds == 0).any():
                add(f"{name}_false_positive_null", float(result["detected"][kinds == 0].mean()))
            discoveries = int(result["detected"].sum())
            if discoveries:
                wrong = int((result["detected"] & ~result["hit"]).sum())
                add(f"{name}_false_discovery", wrong / discoveries)
            add(f"{name}_discoveries", float(discoveries))
            add(f"{name}_purity", float(result["purity"].mean()))
        for metric, prefix in (("purity", "gap"), ("best_excess", "best_gap")):
            sae_values, raw_values = results["sae"][metric], results["raw"][metric]
            low, high = bootstrap_difference(sae_values, raw_values, resamples=bootstrap_resamples, seed=seed + rep)
            add(prefix, float(sae_values.mean() - raw_values.mean()))
            add(f"{prefix}_power", float(low > 0))
            add(f"{prefix}_interval_width", float(high - low))
    summary = {key: float(np.mean(values)) for key, values in rows.items()}
    return {"design": {**asdict(design), "combinations": design.combinations, "generations": design.generations,
                       "concept_values": design.concept_values},
            "raw": asdict(raw), "sae": asdict(sae), "repetitions": repetitions, "seed": seed, "alpha": alpha,
            "chance_purity": chance_purity(design, seed), **summary}
