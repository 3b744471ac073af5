"""Known answers for the concept-score statistics (ddr_core/concept_stats.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ddr_core.concept_stats import (
    agreement_permutation_test,
    benjamini_hochberg,
    bootstrap_difference,
    bootstrap_interval,
    expected_purity,
    max_count_tail,
    target_arrangements,
)


def _brute_force(counts, k):
    pool = [v for v, n in enumerate(counts) for _ in range(n)]
    maxima = [max(np.bincount(np.asarray(s), minlength=len(counts))) for s in itertools.combinations(pool, k)]
    return np.asarray(maxima)


def test_purity_null_by_hand():
    # pool a, a, b, b; two drawn: {aa}, {bb} of 6 subsets have a maximum count of 2
    assert max_count_tail([2, 2], 2, 2) == pytest.approx(1 / 3)
    assert max_count_tail([2, 2], 2, 1) == 1.0
    assert expected_purity([2, 2], 2) == pytest.approx((2 * 2 + 4 * 1) / 6 / 2)


@pytest.mark.parametrize(("counts", "k"), [([3, 4, 5], 5), ([1, 1, 6], 4), ([2, 3, 2, 3], 6), ([9, 9, 9, 9], 3)])
def test_purity_null_equals_enumeration(counts, k):
    maxima = _brute_force(counts, k)
    for observed in range(1, k + 1):
        assert max_count_tail(counts, k, observed) == pytest.approx((maxima >= observed).mean(), abs=1e-12)
    assert expected_purity(counts, k) == pytest.approx(maxima.mean() / k, abs=1e-12)


def test_purity_null_of_the_toy_world_resolves_tiny_p_values():
    """36 prompts, 4 colours x 9: a top-10 of distinct prompts with 9 of one colour. By hand: 4 colours x
    C(9,9) x C(27,1) subsets hold 9 of a colour (10 of one colour is impossible) out of C(36,10)."""
    assert max_count_tail([9, 9, 9, 9], 10, 9) == pytest.approx(4 * 27 / math.comb(36, 10), rel=1e-12)
    assert max_count_tail([9, 9, 9, 9], 10, 10) == 0.0
    with pytest.raises(ValueError, match="cannot draw k=37"):
        max_count_tail([9, 9, 9, 9], 37, 5)


def test_benjamini_hochberg_by_hand():
    # sorted p 0.005, 0.01, 0.03, 0.04 -> p x 4 / rank = 0.02, 0.02, 0.04, 0.04 (monotone already)
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert np.allclose(q[:4], [0.02, 0.04, 0.04, 0.02]) and np.isnan(q[4])


def test_agreement_permutation_by_hand():
    """Three channels whose images all show their own value: only the identity of the 3! channel-label
    permutations reaches that rate, so p = 1/6; a random image shows a given target 1/3 of the time."""
    predictions = [["a"] * 4, ["b"] * 4, ["c"] * 4]
    result = agreement_permutation_test(predictions, ["a", "b", "c"], permutations=20000, seed=1)
    assert result["rate"] == 1.0 and result["chance_per_image"] == pytest.approx(1 / 3)
    assert result["p_value"] == pytest.approx(1 / 6, abs=0.01) and result["units"] == 3
    swapped = agreement_permutation_test(predictions, ["b", "a", "c"], permutations=2000)
    assert swapped["rate"] == pytest.approx(1 / 3) and swapped["p_value"] > 0.5
    empty = agreement_permutation_test([[], ["a"]], [None, None])
    assert empty["units"] == 0 and math.isnan(empty["rate"])


def test_bootstrap_intervals_match_the_normal_approximation():
    data = [0.0, 1.0] * 50  # mean 0.5, standard error sqrt(0.25 / 100) = 0.05
    low, high = bootstrap_interval(data, resamples=5000, seed=3)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_interval([0.7, 0.7, 0.7]) == (0.7, 0.7)
    assert all(math.isnan(v) for v in bootstrap_interval([0.5]))
    # difference of two such samples: standard error sqrt(2) x 0.05
    low, high = bootstrap_difference([1.0, 2.0] * 50, data, resamples=5000, seed=4)
    half_width = 1.96 * math.sqrt(2) * 0.05
    assert low == pytest.approx(1.0 - half_width, abs=0.02) and high == pytest.approx(1.0 + half_width, abs=0.02)


def test_agreement_permutations_stay_within_their_stratum():
    """Two families: colour units can only swap targets with colour units. Each family has two units that
    show their own value: within a family only 1 of 2 orders reaches the rate, so p = 1/4 over both."""
    predictions = [["red"] * 3, ["blue"] * 3, ["circle"] * 2, ["square"] * 2]
    result = agreement_permutation_test(predictions, ["red", "blue", "circle", "square"],
                                        strata=["colour", "colour", "shape", "shape"], permutations=20000, seed=2)
    assert result["rate"] == 1.0 and result["p_value"] == pytest.approx(1 / 4, abs=0.01)
    assert result["chance_per_image"] == pytest.approx(0.5) and result["images"] == 10


def test_the_smallest_attainable_agreement_p_counts_the_target_arrangements():
    """The demo's 7 SAE (dream, family) pairs had the targets circle, square, square (shape) and black x3, white
    (background): 3 x 4 = 12 distinct arrangements, so even images that all show their concept give p >= 1/12 and the
    issue's p < 0.001 is out of reach whatever the pictures. Identical targets add no arrangements."""
    targets = ["circle", "square", "square", "black", "black", "black", "white"]
    strata = ["shape"] * 3 + ["background"] * 4
    assert target_arrangements(targets, strata) == 12
    assert target_arrangements(["a", "b", "c"], [""] * 3) == 6 and target_arrangements(["a"] * 5, [""] * 5) == 1
    perfect = agreement_permutation_test([[t] * 3 for t in targets], targets, strata=strata, permutations=20000, seed=3)
    assert perfect["rate"] == 1.0 and perfect["p_floor"] == pytest.approx(1 / 12)
    assert perfect["p_value"] == pytest.approx(1 / 12, abs=0.01)  # the best possible images sit at the floor
    same = agreement_permutation_test([["a"], ["a"], ["a"]], ["a", "a", "a"], permutations=500)
    assert same["rate"] == 1.0 and same["p_floor"] == 1.0 and same["p_value"] == 1.0
    assert math.isnan(agreement_permutation_test([[]], [None])["p_floor"])
