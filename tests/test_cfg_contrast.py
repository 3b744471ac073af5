"""``cfg_contrast``: the conditional vs the unconditional CFG half per channel, over prompts (known answers)."""

import json

import numpy as np
import polars as pl
import pytest
from scipy import stats

from ddr_core.activation_store import ActivationStore, VariantBatch
from ddr_core.cfg_contrast import (
    CHANNELS_FILE,
    PROFILES_FILE,
    PROMPT_EFFECTS_FILE,
    CfgContrastConfig,
    channel_contrast,
    compute_cfg_contrast,
    contrast_sentence,
)

TIMESTEPS = [900, 500, 100]
PROMPTS, IMAGES, WIDTH = 5, 2, 3


def make_store(root, cond, uncond, per_batch):
    """``(G, T, F)`` halves, generation ``g`` = prompt ``g // IMAGES``, image ``g % IMAGES``; batches of
    ``per_batch`` generations (3 splits a prompt's two images across batches)."""
    store = ActivationStore(root)
    n = cond.shape[0]
    for batch_index, start in enumerate(range(0, n, per_batch)):
        ids = range(start, min(start + per_batch, n))
        rows = [{"generation_id": g, "prompt_index": g // IMAGES, "prompt": f"prompt {g // IMAGES}",
                 "image_index": g % IMAGES, "seed": g, "image_path": f"images/{g:04d}.png"} for g in ids]
        half = None if uncond is None else uncond[start:start + per_batch]
        store.write_batch(batch_index, rows, TIMESTEPS, {"raw": VariantBatch(cond[start:start + per_batch], half)})
    store.finalize()
    return store


def halves(seed=0):
    """Channel 0: the prompt adds about 1 (prompt-specific, image noise on top); channel 1: both halves equal;
    channel 2: the prompt removes 0.5 exactly at t=500 only."""
    rng = np.random.default_rng(seed)
    g = PROMPTS * IMAGES
    uncond = rng.normal(size=(g, len(TIMESTEPS), WIDTH)).astype(np.float16).astype(np.float32)
    cond = uncond.copy()
    per_prompt = 1.0 + rng.normal(scale=0.2, size=PROMPTS)
    cond[:, :, 0] += np.repeat(per_prompt, IMAGES)[:, None] + rng.normal(scale=0.1, size=(g, len(TIMESTEPS)))
    cond[:, 1, 2] -= 0.5
    return cond.astype(np.float16).astype(np.float32), uncond


@pytest.mark.parametrize("per_batch", [2, 3, 10])
def test_difference_interval_and_p_are_the_t_test_over_prompt_means(tmp_path, per_batch):
    cond, uncond = halves()
    store = make_store(tmp_path / "capture", cond, uncond, per_batch)
    summary = compute_cfg_contrast(store, "raw", tmp_path / "out", CfgContrastConfig())
    table = pl.read_parquet(tmp_path / "out" / CHANNELS_FILE)
    # by hand: the stored float16 values, images averaged per prompt, then timesteps; a t-test over 5 prompts
    stored_cond = cond.astype(np.float16).astype(np.float64)
    stored_uncond = uncond.astype(np.float16).astype(np.float64)
    d = (stored_cond - stored_uncond).reshape(PROMPTS, IMAGES, len(TIMESTEPS), WIDTH).mean(axis=(1, 2))
    expected = stats.ttest_1samp(d[:, [0, 2]], 0.0, axis=0)
    interval = stats.ttest_1samp(d[:, 0], 0.0).confidence_interval(0.95)
    row0, row1, row2 = table.to_dicts()
    assert row0["difference"] == pytest.approx(d[:, 0].mean(), rel=1e-9)
    assert (row0["ci_low"], row0["ci_high"]) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert row0["p_value"] == pytest.approx(expected.pvalue[0], rel=1e-9)
    assert row0["verdict"] == "text-driven" and row0["n_prompts"] == PROMPTS
    assert row1["difference"] == 0 and row1["p_value"] == 1.0 and row1["verdict"] == "no evidence"
    # channel 2: exactly -0.5 / 3 timesteps in every prompt (within float16): zero spread, an exact answer
    assert row2["difference"] == pytest.approx(-0.5 / 3, abs=2e-3) and row2["verdict"] == "text-suppressed"
    assert summary.halves == 2 and summary.text_driven == 1 and summary.text_suppressed == 1
    effects = pl.read_parquet(tmp_path / "out" / PROMPT_EFFECTS_FILE)  # d itself, one row per prompt
    assert effects["prompt"].to_list() == [f"prompt {p}" for p in range(PROMPTS)]
    assert np.stack(effects["effect"].to_numpy()) == pytest.approx(d, abs=1e-6)
    profile = pl.read_parquet(tmp_path / "out" / PROFILES_FILE).filter(pl.col("channel") == 2)
    assert profile["timestep"].to_list() == TIMESTEPS
    assert profile["difference"].to_list() == pytest.approx([0.0, -0.5, 0.0], abs=2e-3)
    per_timestep = (stored_cond - stored_uncond).reshape(PROMPTS, IMAGES, len(TIMESTEPS), WIDTH).mean(axis=1)
    at_500 = stats.ttest_1samp(per_timestep[:, 1, 0], 0.0).confidence_interval(0.95)
    row = pl.read_parquet(tmp_path / "out" / PROFILES_FILE).filter(
        (pl.col("channel") == 0) & (pl.col("timestep") == 500)).to_dicts()[0]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((at_500.low, at_500.high), rel=1e-9)


def test_no_difference_is_called_at_about_alpha_under_the_null(tmp_path):
    """Both halves from the same distribution, 40 channels: the q-values call nothing text-driven."""
    rng = np.random.default_rng(3)
    shape = (PROMPTS * IMAGES, len(TIMESTEPS), 40)
    store = make_store(tmp_path / "capture", rng.normal(size=shape), rng.normal(size=shape), 4)
    summary = compute_cfg_contrast(store, "raw", tmp_path / "out")
    assert summary.text_driven + summary.text_suppressed == 0


def test_a_guidance_free_capture_has_one_half_and_no_tables(tmp_path):
    cond, uncond = halves()
    out = tmp_path / "out"
    compute_cfg_contrast(make_store(tmp_path / "two", cond, uncond, 4), "raw", out)
    assert (out / CHANNELS_FILE).is_file()
    summary = compute_cfg_contrast(make_store(tmp_path / "one", cond, None, 4), "raw", out)
    assert summary.halves == 1 and "only the conditional half" in summary.reason
    assert not (out / CHANNELS_FILE).exists() and not (out / PROFILES_FILE).exists()  # the old result is gone
    assert json.loads((out / "summary.json").read_text())["halves"] == 1
    read = channel_contrast(out, 0)
    assert read[1] is None and "one half only" in contrast_sentence(read[0], None)


def test_card_sentence_is_plain_text_with_the_figures(tmp_path):
    cond, uncond = halves()
    compute_cfg_contrast(make_store(tmp_path / "capture", cond, uncond, 4), "raw", tmp_path / "out")
    summary, profile, row = channel_contrast(tmp_path / "out", 0)
    assert profile.height == len(TIMESTEPS)
    sentence = contrast_sentence(summary, row)
    assert sentence.startswith("Conditional vs unconditional (text-driven)") and "over 5 prompts" in sentence
    assert contrast_sentence(None, None).endswith("(materialize cfg_contrast).")


def test_the_text_effect_on_a_channels_own_concept_is_found_and_the_null_is_not():
    """``cfg_truth``: channel 0's prompt effect is 1 on the 10 red prompts and 0 on the 10 blue ones (by hand: d has
    mean 0.5, sd sqrt(5/19), so z = +-0.5 / sd and the effect is 1 / sd = 1.949); a noise channel paired with a
    colour is not called; a pair whose value no prompt names is left out."""
    from ddr_core.cfg_truth import concept_pairs, concept_text_effect

    rng = np.random.default_rng(0)
    labels = pl.DataFrame({"colour": ["red", "blue"] * 10, "shape": ["circle"] * 20})
    effects = np.stack([np.tile([1.0, 0.0], 10), rng.normal(size=20)], axis=1)
    pairs = concept_pairs({0: "colour=red", 1: "colour=blue, shape=square", 2: None})
    assert pairs == [(0, "colour", "red"), (1, "colour", "blue"), (1, "shape", "square")]
    one = concept_text_effect(effects, labels, pairs[:1], permutations=999, bootstraps=200)
    assert one["n_pairs"] == 1 and one["effect"] == pytest.approx(1 / np.sqrt(5 / 19), rel=1e-9)
    assert one["p_value"] == pytest.approx(1 / 1000, abs=2e-3)  # only the identity-like splits reach it
    assert one["positive_share"] == 1.0 and one["interval"][0] > 1.5
    noise = concept_text_effect(effects, labels, pairs[1:], permutations=999, bootstraps=200)
    assert noise["n_pairs"] == 1  # shape=square: no prompt names it
    assert noise["p_value"] > 0.05 and noise["interval"][0] < 0 < noise["interval"][1]
    assert abs(noise["null_mean"]) < 0.1
    with pytest.raises(ValueError, match="do not match"):
        concept_text_effect(effects[:5], labels, pairs)
