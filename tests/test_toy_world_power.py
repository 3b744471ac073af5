"""The toy-world power simulation (ddr_core.toy_training.power) at tiny size, against answers known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ddr_core.toy_training.power import PlantedBasis, WorldDesign, chance_purity, score_basis, simulate_power

TINY = WorldDesign("tiny", {"colour": 4, "shape": 3, "background": 3}, None, 2, width=16, sae_width=32)


def test_chance_purity_matches_the_hand_computed_hypergeometric_maximum() -> None:
    # 4 prompts (2 x 2 values), top 2: per family counts [2, 2]; P(both the same value) = 2 / C(4, 2) = 1/3,
    # so E[max] = 1 + 1/3 and the chance purity is (4/3) / 2 = 2/3 for each family
    design = WorldDesign("hand", {"a": 2, "b": 2}, None, 1, width=1, sae_width=1, n_examples=2)
    assert chance_purity(design) == pytest.approx(2 / 3)


def test_noise_free_monosemantic_units_are_all_found_and_null_units_never() -> None:
    strong = PlantedBasis(1.0, 0.0, effect=50.0, sigma_prompt=0.01, sigma_image=0.01)
    result = simulate_power(TINY, strong, strong, repetitions=2, seed=1, bootstrap_resamples=200)
    assert result["raw_power_mono"] == 1.0 and result["sae_power_mono"] == 1.0
    assert result["raw_false_discovery"] == 0.0
    silent = PlantedBasis(0.0, 0.0)
    null = simulate_power(TINY, silent, silent, repetitions=3, seed=2, bootstrap_resamples=200)
    assert null["raw_false_positive_null"] == 0.0 and null["raw_discoveries"] == 0.0  # 36 prompts, top 10: p >> q


def test_a_perfectly_selective_channel_has_purity_one_in_its_family() -> None:
    rng = np.random.default_rng(0)
    from ddr_core.toy_training.power import _make_pool

    design = WorldDesign("one", {"colour": 4, "shape": 3}, None, 1, width=4, sae_width=4, n_examples=3)
    pool = _make_pool(design, rng)
    basis = PlantedBasis(1.0, 0.0, effect=100.0, sigma_prompt=0.001, sigma_image=0.001)
    result = score_basis(design, basis, 4, pool, rng)
    # the top 3 of the 12 prompts all hold the planted value (a colour has 3 prompts, a shape 4): that family's
    # purity is 1 and the other family's 1/3 (3 distinct values), so every unit's mean purity is exactly 2/3
    assert np.allclose(result["purity"], 2 / 3)


def test_within_family_superposition_lowers_raw_purity_and_the_gap_is_found() -> None:
    raw = PlantedBasis(1.0, 1.0, effect=20.0, sigma_prompt=0.1, sigma_image=0.1)
    sae = PlantedBasis(1.0, 0.0, effect=20.0, sigma_prompt=0.1, sigma_image=0.1)
    result = simulate_power(TINY, raw, sae, repetitions=3, seed=3, bootstrap_resamples=500)
    assert result["gap"] > 0.03 and result["gap_power"] == 1.0


def test_across_family_superposition_is_invisible_to_mean_purity() -> None:
    # "red or circle" units rank red circles first: high purity in both families, never below a monosemantic unit
    raw = PlantedBasis(1.0, 1.0, poly_mode="across", effect=20.0, sigma_prompt=0.1, sigma_image=0.1)
    sae = PlantedBasis(1.0, 0.0, poly_mode="across", effect=20.0, sigma_prompt=0.1, sigma_image=0.1)
    result = simulate_power(TINY, raw, sae, repetitions=3, seed=4, bootstrap_resamples=500)
    assert result["gap"] <= 0.0 and result["gap_power"] == 0.0


def test_the_simulation_is_seeded() -> None:
    basis = PlantedBasis(0.5, 0.5)
    first = simulate_power(TINY, basis, basis, repetitions=2, seed=7, bootstrap_resamples=200)
    second = simulate_power(TINY, basis, basis, repetitions=2, seed=7, bootstrap_resamples=200)
    assert first == second


def test_designs_reject_impossible_captures() -> None:
    with pytest.raises(ValueError, match="prompts must be in"):
        WorldDesign("bad", {"a": 2, "b": 2}, 5, 1)
    with pytest.raises(ValueError, match=">= 2 values"):
        WorldDesign("bad", {"a": 1}, None, 1)
