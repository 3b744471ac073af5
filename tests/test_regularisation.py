"""Penalties, gradient transforms and augmentation of deep-dream optimisation, against hand computations."""

from __future__ import annotations

import pytest
import torch

from ddr_core.regularisation import (
    AUGMENTATION_PRESETS,
    LatentAugmentation,
    fourier_precondition,
    gaussian_kernel1d,
    gaussian_smooth,
    moment_penalty,
    range_penalty,
    roll_per_element,
    rotate_scale,
    smoothing_sigma,
    total_variation,
)


def test_total_variation_of_a_known_array():
    element = torch.tensor([[[0.0, 1.0], [3.0, 5.0]]])  # (1 channel, 2, 2)
    # vertical |3-0|, |5-1| -> mean 3.5; horizontal |1-0|, |5-3| -> mean 1.5
    latents = torch.stack([element, torch.zeros_like(element)])
    assert total_variation(latents).tolist() == pytest.approx([5.0, 0.0])


def test_total_variation_is_per_element():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 6, 6, generator=generator)
    batched = total_variation(torch.stack([a, b]))
    assert batched[0] == pytest.approx(float(total_variation(a[None])[0]))
    assert batched[1] == pytest.approx(float(total_variation((b * 10)[None])[0]) / 10)


def test_range_penalty_zero_inside_threshold_and_quadratic_outside():
    inside = torch.full((1, 2, 3, 3), 2.999)
    inside[0, 0, 0, 0] = -3.0
    assert range_penalty(inside, threshold=3.0).tolist() == [0.0]
    outside = torch.zeros(1, 1, 2, 2)
    outside[0, 0, 0, 0] = 5.0  # (5 - 3)^2 = 4, mean over 4 values
    outside[0, 0, 1, 1] = -4.0  # (4 - 3)^2 = 1
    assert range_penalty(outside, threshold=3.0).tolist() == pytest.approx([5.0 / 4])


def test_moment_penalty_hand_values():
    constant = torch.full((1, 1, 2, 2), 2.0)  # |mean| = 2, std = 0 -> |0 - 1| = 1
    standard = torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 2, 2)
    standard = standard / standard.flatten().std()  # mean 0, unbiased std 1
    assert moment_penalty(torch.cat([constant, standard])).tolist() == pytest.approx([3.0, 0.0], abs=1e-6)


def test_penalties_reject_non_4d_input():
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        total_variation(torch.zeros(3, 4, 4))


def test_fourier_preconditioning_keeps_each_elements_std_and_favours_low_frequencies():
    height = width = 16
    y = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    x = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    low = torch.cos(2 * torch.pi * x / width)  # frequency 1
    high = torch.cos(torch.pi * (x + y))  # checkerboard: highest frequency
    grad = torch.stack([(low + high).expand(4, -1, -1), 7.0 * high.expand(4, -1, -1)])
    out = fourier_precondition(grad)
    assert out.shape == grad.shape
    for element in range(2):
        assert float(out[element].std()) == pytest.approx(float(grad[element].std()), rel=1e-4)
    # Element 0: the low-frequency share grows (scale 1/2 vs 1/(sqrt(128)+1)).
    low_coefficient = float((out[0, 0] * low).sum() / (low * low).sum())
    high_coefficient = float((out[0, 0] * high).sum() / (high * high).sum())
    low_share = low_coefficient / high_coefficient
    assert low_share == pytest.approx((1 / 2) / (1 / (128**0.5 + 1)), rel=1e-3)
    # Element 1 is a single frequency: only renormalised, so unchanged.
    torch.testing.assert_close(out[1], grad[1], rtol=1e-4, atol=1e-4)


def test_fourier_preconditioning_zero_gradient_stays_zero():
    assert torch.equal(fourier_precondition(torch.zeros(2, 4, 8, 8)), torch.zeros(2, 4, 8, 8))


def test_gaussian_smoothing_sigma_zero_is_identity():
    grad = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert gaussian_smooth(grad, 0.0, 9) is grad


def test_gaussian_smoothing_matches_hand_kernel():
    grad = torch.zeros(1, 1, 11, 11)
    grad[0, 0, 5, 5] = 1.0
    out = gaussian_smooth(grad, sigma=1.0, kernel_size=5)
    kernel = gaussian_kernel1d(5, 1.0)
    expected = torch.zeros(11, 11)
    expected[3:8, 3:8] = kernel[:, None] * kernel[None, :]
    torch.testing.assert_close(out[0, 0], expected)
    constant = torch.full((1, 2, 6, 6), 3.0)  # reflect padding keeps constants
    torch.testing.assert_close(gaussian_smooth(constant, 2.0, 9), constant)
    with pytest.raises(ValueError, match="odd"):
        gaussian_smooth(grad, 1.0, 4)


def test_smoothing_sigma_linear_schedule():
    assert smoothing_sigma(0, 100, 0.5, 0.0) == pytest.approx(0.5)
    assert smoothing_sigma(99, 100, 0.5, 0.0) == pytest.approx(0.0)
    assert smoothing_sigma(33, 67, 0.5, 0.0) == pytest.approx(0.25)


def test_augmentation_level_0_is_identity():
    latents = torch.randn(3, 4, 8, 8)
    augmentation = LatentAugmentation.preset(0)
    assert augmentation.is_identity
    assert augmentation(latents, torch.Generator().manual_seed(0)) is latents


def test_rotation_by_zero_and_scale_one_is_identity():
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    out = rotate_scale(latents, torch.zeros(2), torch.ones(2))
    torch.testing.assert_close(out, latents, rtol=1e-5, atol=1e-5)


def test_rotation_by_90_degrees_is_a_quarter_turn():
    latents = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    out = rotate_scale(latents, torch.tensor([90.0]), torch.ones(1))
    candidates = [torch.rot90(latents, k, dims=(2, 3)) for k in (1, -1)]
    assert any(torch.allclose(out, c, atol=1e-5) for c in candidates)


def test_roll_per_element_matches_torch_roll():
    latents = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(4))
    shift_y, shift_x = torch.tensor([0, 2, -1]), torch.tensor([3, -2, 0])
    out = roll_per_element(latents, shift_y, shift_x)
    for b in range(3):
        expected = torch.roll(latents[b], (int(shift_y[b]), int(shift_x[b])), dims=(1, 2))
        assert torch.equal(out[b], expected)


def test_augmentation_presets_and_overrides():
    assert AUGMENTATION_PRESETS[3] == (16, 45.0, 1.8)
    augmentation = LatentAugmentation.preset(2, rotate_max=0.0)
    assert (augmentation.jitter_max, augmentation.rotate_max, augmentation.scale_max) == (8, 0.0, 1.2)
    with pytest.raises(ValueError, match="level"):
        LatentAugmentation.preset(4)
    with pytest.raises(ValueError, match="scale_max"):
        LatentAugmentation(scale_max=0.5)


def test_augmentation_draws_per_element_generators_independent_of_batch():
    augmentation = LatentAugmentation.preset(3)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    batched = augmentation(latents, [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = augmentation(latents[1:2], [torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batched[1:2], alone)
    params = augmentation.sample(200, torch.Generator().manual_seed(6))
    assert int(params.shift_x.abs().max()) <= 16 and float(params.angles_deg.abs().max()) <= 45.0
    assert float(params.scales.min()) >= 1.0 and float(params.scales.max()) <= 1.8
    assert not torch.allclose(batched, latents)
