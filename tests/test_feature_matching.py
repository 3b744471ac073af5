"""Known-answer tests of feature matching (ddr_core.feature_matching, ddr_core.feature_matching_concepts)."""

from __future__ import annotations

import numpy as np
import pytest

from ddr_core.feature_matching import (
    APPEARED,
    MATCHED,
    SILENT,
    VANISHED,
    MatchingConfig,
    block_permutation,
    correlation_matrix,
    cosine_matrix,
    match_activations,
    match_directions,
)
from ddr_core.feature_matching_concepts import (
    concept_diff,
    concept_selectivity,
    prompt_means,
    wilson_interval,
)

CONFIG = MatchingConfig(n_permutations=99, seed=1)


def _activations(n_prompts: int = 16, per_prompt: int = 3, timesteps: int = 4, features: int = 8,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(g, T, F) activations whose features each follow their own prompt-level signal, plus a timestep trend
    shared by every feature and a little noise; and each generation's prompt."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_prompts), per_prompt)
    prompt_signal = rng.standard_normal((n_prompts, features))
    trend = np.linspace(0, 5, timesteps)[None, :, None]
    values = (prompt_signal[groups][:, None, :] * (1 + 0.2 * np.arange(timesteps))[None, :, None] + trend
              + 0.3 * rng.standard_normal((groups.size, timesteps, features)))
    return values, groups


def test_a_permuted_copy_matches_exactly() -> None:
    a, groups = _activations()
    permutation = np.random.default_rng(3).permutation(a.shape[2])
    b = a[:, :, permutation]
    result = match_activations(a, b, groups, CONFIG)
    inverse = np.argsort(permutation)
    assert result.a.best.tolist() == inverse.tolist()
    assert result.b.best.tolist() == permutation.tolist()
    np.testing.assert_allclose(result.a.score, 1.0, atol=1e-9)
    assert set(result.a.status) == {MATCHED} and set(result.b.status) == {MATCHED}
    rows, cols = result.hungarian
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == dict(enumerate(inverse.tolist()))
    assert (result.a.p_value <= 1 / 100 + 1e-12).all()


def test_a_negated_feature_matches_by_absolute_correlation_only() -> None:
    a, groups = _activations(features=4)
    b = a.copy()
    b[:, :, 2] *= -1
    result = match_activations(a, b, groups, CONFIG.model_copy(update={"absolute": True}))
    assert result.a.status[2] == MATCHED and result.a.signed[2] == pytest.approx(-1.0)
    signed_only = match_activations(a, b, groups, CONFIG)
    assert signed_only.a.status[2] == VANISHED


def test_a_removed_feature_vanishes_and_a_noise_feature_is_not_matched() -> None:
    a, groups = _activations(features=8, seed=4)
    rng = np.random.default_rng(9)
    noise = rng.standard_normal((a.shape[0], a.shape[1], 1))
    b = np.concatenate([np.delete(a, 5, axis=2), noise], axis=2)  # feature 5 removed, a noise-only one added
    result = match_activations(a, b, groups, CONFIG)
    assert result.a.status[5] == VANISHED
    assert [s for i, s in enumerate(result.a.status) if i != 5] == [MATCHED] * 7
    assert result.b.status[-1] == APPEARED
    assert result.b.status[:-1] == [MATCHED] * 7
    assert result.a.score[5] <= result.a.null_threshold[5] + 0.2


def test_a_shared_timestep_trend_alone_is_no_match() -> None:
    """Two features with the same strong trend over timesteps but unrelated content: no match once centred;
    without the per-timestep centring the trend alone makes them look alike."""
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(20), 2)
    trend = np.linspace(0, 50, 10)[None, :, None]
    a = trend + rng.standard_normal((40, 10, 1))
    b = trend + rng.standard_normal((40, 10, 1))
    assert match_activations(a, b, groups, CONFIG).a.status == [VANISHED]
    raw = match_activations(a, b, groups, CONFIG.model_copy(update={"center_timesteps": False}))
    assert raw.a.score[0] > 0.9


def test_a_constant_feature_is_silent_and_never_anyones_match() -> None:
    a, groups = _activations(features=3)
    b = a.copy()
    b[:, :, 1] = 7.0
    result = match_activations(a, b, groups, CONFIG)
    assert result.b.status[1] == SILENT and np.isnan(result.b.p_value[1])
    assert 1 not in result.a.best.tolist()
    assert result.a.status[1] == VANISHED


def test_the_null_keeps_p_values_uniform_for_unrelated_variants() -> None:
    """Independent A and B: about alpha of the features are called matched (the null is calibrated)."""
    calls = []
    for seed in range(6):
        a, groups = _activations(features=10, seed=100 + seed)
        b, _ = _activations(features=10, seed=200 + seed)
        calls += match_activations(a, b, groups, CONFIG).a.status
    assert calls.count(MATCHED) / len(calls) <= 0.12


def test_block_permutation_moves_whole_prompts() -> None:
    groups = np.repeat(np.arange(5), 3)
    index = block_permutation(groups, np.random.default_rng(0))
    moved = groups[index].reshape(5, 3)
    assert (moved == moved[:, :1]).all() and sorted(moved[:, 0].tolist()) == list(range(5))


def test_shapes_are_checked() -> None:
    a, groups = _activations()
    with pytest.raises(ValueError, match="same generations"):
        match_activations(a, a[:-1], groups, CONFIG)
    with pytest.raises(ValueError, match="at least 3 prompts"):
        match_activations(a[:6], a[:6], np.array([0, 0, 0, 1, 1, 1]), CONFIG)
    with pytest.raises(ValueError, match="same samples"):
        correlation_matrix(np.zeros((3, 2)), np.zeros((4, 2)))


def test_direction_similarity_finds_a_known_rotation() -> None:
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    sae = rng.standard_normal((9, 6)) * rng.uniform(0.5, 3, (9, 1))  # decoder rows of arbitrary norms
    # cosines of SAE rows with raw channel unit vectors are the rows' normalised coordinates
    np.testing.assert_allclose(cosine_matrix(sae, np.eye(6)), sae / np.linalg.norm(sae, axis=1, keepdims=True))
    # the same rotation of both spaces changes no cosine
    np.testing.assert_allclose(cosine_matrix(sae @ rotation, np.eye(6) @ rotation), cosine_matrix(sae, np.eye(6)),
                               atol=1e-12)
    # a rotated, permuted and sign-flipped copy: every row's best match is its source
    permutation = rng.permutation(9)
    signs = rng.choice([-1.0, 1.0], 9)[:, None]
    other = 2.0 * signs * sae[permutation]
    result = match_directions(sae, other, draws=200)
    assert result.best_b.tolist() == permutation.tolist()
    np.testing.assert_allclose(result.score_b, 1.0)
    assert dict(zip(*[x.tolist() for x in result.hungarian], strict=True)) == {
        int(p): i for i, p in enumerate(permutation)}
    assert 0 < result.null_threshold_a < 1
    with pytest.raises(ValueError, match="not in one space"):
        cosine_matrix(np.eye(3), np.eye(4))


def test_random_directions_stay_below_the_direction_null() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((200, 32)), rng.standard_normal((16, 32))
    result = match_directions(a, b, draws=2000, seed=3)
    assert 0.01 <= float((result.score_a > result.null_threshold_a).mean()) <= 0.12


def test_concept_diff_names_the_removed_concept() -> None:
    """A has features selective for each of 4 colours; B lacks the 'yellow' ones: yellow is the one value whose
    selective features vanish more than chance."""
    colours = ["red", "green", "blue", "yellow"]
    shapes = ["circle", "square", "triangle"]
    labels = [{"colour": c, "shape": s} for c in colours for s in shapes for _ in range(2)]  # 24 prompts
    rng = np.random.default_rng(0)
    n_prompts = len(labels)
    per_prompt, features = 3, 16
    groups = np.repeat(np.arange(n_prompts), per_prompt)
    signal = 0.3 * rng.standard_normal((n_prompts, features))
    owner = [colours[f % 4] for f in range(features)]  # features 3, 7, 11, 15 are yellow's
    for f, colour in enumerate(owner):
        signal[[i for i, lab in enumerate(labels) if lab["colour"] == colour], f] += 2.0 + 0.5 * rng.standard_normal()
        signal[:, f] += 0.8 * rng.standard_normal(n_prompts)  # each feature also has its own content
    a = signal[groups][:, None, :] + 0.2 * rng.standard_normal((groups.size, 2, features))
    kept = [f for f in range(features) if owner[f] != "yellow"]
    b = a[:, :, kept] + 0.05 * rng.standard_normal((groups.size, 2, len(kept)))
    result = match_activations(a, b, groups, CONFIG)
    ids, means = prompt_means(a, groups)
    rows = concept_diff(result.a.status, means, [labels[i] for i in ids],
                        {"colour": colours, "shape": shapes}, n_permutations=499, scores=result.a.score)
    by_value = {row["value"]: row for row in rows}
    assert by_value["yellow"]["selective_features"] == [3, 7, 11, 15]
    assert by_value["yellow"]["n_vanished"] == 4 and by_value["yellow"]["fisher_p"] < 0.01
    assert by_value["yellow"]["share_low"] > by_value["yellow"]["share_vanished_others"]
    assert all(row["n_vanished"] == 0 for row in rows if row["value"] in ("red", "green", "blue"))
    assert [row["value"] for row in rows if row["fisher_q"] < 0.05] == ["yellow"]
    assert by_value["yellow"]["median_score"] < 0.5 < by_value["red"]["median_score"]
    assert by_value["yellow"]["mannwhitney_p"] < 0.01 and by_value["red"]["mannwhitney_p"] > 0.2
    # |r| pairs a "yellow" feature with the complement ("red, green or blue") features of B: why r is the default
    absolute = match_activations(a, b, groups, CONFIG.model_copy(update={"absolute": True}))
    assert absolute.a.status[3] == MATCHED and absolute.a.signed[3] < 0


def test_concept_selectivity_and_wilson() -> None:
    means = np.array([[1.0, 0.0], [1.0, 5.0], [0.0, 0.0], [0.0, 5.0]] * 3)
    effect, p, _ = concept_selectivity(means, np.array([True, True, False, False] * 3), n_permutations=999)
    assert effect[0] > 1.5 and p[0] < 0.01 and abs(effect[1]) < 1e-9 and p[1] > 0.5
    with pytest.raises(ValueError, match="both kinds"):
        concept_selectivity(means, np.ones(12, dtype=bool))
    low, high = wilson_interval(4, 4)
    assert 0.45 < low < 0.55 and high == 1.0
