"""Capture: resume after a kill, sharding, recorded seeds, plan checks (tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ddr_core.activation_store import ActivationStore
from ddr_core.activations import CaptureConfig, CapturePlanMismatch, generation_seed, run_capture
from ddr_core.basis import RawChannels, TopKSaeBasis
from ddr_core.families import as_model
from ddr_core.sae import load_sae
from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER

PROMPTS = list(TINY_PROMPTS[:5])


@pytest.fixture(scope="module")
def reducers(tiny_sae_dir):
    sae = load_sae(tiny_sae_dir, expected_d_in=64)
    return {"tiny-raw": RawChannels(None).reduce, "tiny-sae": TopKSaeBasis(sae).reduce}


def _config(**overrides) -> CaptureConfig:
    base = dict(num_images_per_prompt=2, batch_size=4, num_inference_steps=6, seed=7)
    return CaptureConfig(**{**base, **overrides})


def _capture(pipe, reducers, root: Path, data_root: Path, **kwargs):
    stop = kwargs.pop("stop_after_batches", None)
    return run_capture(pipe, TINY_TARGET_LAYER, reducers, PROMPTS, root, data_root, _config(**kwargs),
                       stop_after_batches=stop)


def _dense(root: Path, variant: str, half: str = "conditional") -> tuple[np.ndarray, np.ndarray]:
    parts = list(ActivationStore(root).iter_dense(variant, half))
    ids = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[2] for p in parts])
    order = np.argsort(ids)
    return ids[order], values[order]


@pytest.fixture(scope="module")
def reference(tiny_pipe, reducers, tmp_path_factory):
    """One uninterrupted capture: 5 prompts x 2 images = 10 generations in 3 batches."""
    data_root = tmp_path_factory.mktemp("ref")
    result = _capture(tiny_pipe, reducers, data_root / "capture", data_root)
    return data_root / "capture", result


def test_uninterrupted_capture_records_everything(reference):
    root, result = reference
    summary = result.summary
    assert summary["complete"] and summary["generations"] == 10 and summary["batches"] == 3
    assert summary["channels"] == {"tiny-raw": 64, "tiny-sae": 256}
    assert len(summary["timesteps"]) == 6
    gens = pl.read_parquet(root / "generations.parquet")
    assert gens["generation_id"].to_list() == list(range(10))
    assert gens["prompt"].to_list() == [p for p in PROMPTS for _ in range(2)]
    assert gens["seed"].to_list() == [generation_seed(7, g) for g in range(10)]
    assert len(set(gens["seed"].to_list())) == 10
    for path in gens["image_path"]:
        assert (root.parent / path).is_file()
    ids, cond = _dense(root, "tiny-raw")
    _, uncond = _dense(root, "tiny-raw", "unconditional")
    assert cond.shape == (10, 6, 64) and uncond.shape == (10, 6, 64)
    assert not np.allclose(cond, uncond)  # the CFG halves are kept apart


def test_kill_and_resume_equals_uninterrupted(tiny_pipe, reducers, reference, tmp_path):
    ref_root, _ = reference
    root = tmp_path / "capture"
    first = _capture(tiny_pipe, reducers, root, tmp_path, stop_after_batches=1)
    assert first.batches_done == [0] and not first.summary["complete"]
    # a half-written batch from the killed run: temp files that must be ignored and cleaned
    (root / "tiny-raw" / "batches" / ".batch_00001.safetensors.tmp-1-dead").write_bytes(b"partial")
    second = _capture(tiny_pipe, reducers, root, tmp_path)
    assert second.batches_skipped == [0] and second.batches_done == [1, 2]
    assert second.summary["complete"] and second.summary["generations"] == 10
    assert not list(root.rglob("*.tmp-*"))
    for variant in ("tiny-raw", "tiny-sae"):
        ids, values = _dense(root, variant)
        ref_ids, ref_values = _dense(ref_root, variant)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(values, ref_values, rtol=1e-3, atol=1e-3)
    gens = pl.read_parquet(root / "generations.parquet")
    assert gens["generation_id"].n_unique() == gens.height == 10  # no duplicated rows


def test_sharded_capture_equals_unsharded(tiny_pipe, reducers, reference, tmp_path):
    ref_root, _ = reference
    root = tmp_path / "capture"
    a = _capture(tiny_pipe, reducers, root, tmp_path, shard_index=1, num_shards=2)
    assert a.batches_done == [1] and not a.summary["complete"]
    b = _capture(tiny_pipe, reducers, root, tmp_path, shard_index=0, num_shards=2)
    assert b.batches_done == [0, 2] and b.summary["complete"]
    for variant in ("tiny-raw", "tiny-sae"):
        np.testing.assert_allclose(_dense(root, variant)[1], _dense(ref_root, variant)[1], rtol=1e-3, atol=1e-3)
    ref = pl.read_parquet(ref_root / "generations.parquet").drop("image_path")
    assert pl.read_parquet(root / "generations.parquet").drop("image_path").equals(ref)


def test_a_generation_is_regenerated_exactly_from_its_seed(tiny_pipe, reducers, reference, tmp_path):
    ref_root, _ = reference
    gens = pl.read_parquet(ref_root / "generations.parquet")
    row = gens.filter(pl.col("generation_id") == 7).to_dicts()[0]
    # alone, in a batch of one, with its recorded seed: same activations as inside its batch
    from ddr_core.hooks import TimestepTracker, capture_activations
    from ddr_core.pipeline import resolve_layer

    layer = resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    latents = as_model(tiny_pipe).initial_latents([row["seed"]], 64, 64)
    with TimestepTracker(tiny_pipe.unet) as tracker, capture_activations(
        layer, tracker, {"raw": RawChannels(None).reduce}, cfg=True
    ) as recording:
        tiny_pipe(prompt=[row["prompt"]], latents=latents, num_inference_steps=6, guidance_scale=7.5,
                  output_type="latent")
    alone = recording.conditional["raw"][:, 0, :].numpy()
    _, values = _dense(ref_root, "tiny-raw")
    np.testing.assert_allclose(alone, values[7], rtol=1e-2, atol=1e-2)


def test_other_parameters_cannot_mix_into_an_existing_capture(tiny_pipe, reducers, reference):
    root, _ = reference
    with pytest.raises(CapturePlanMismatch, match="num_inference_steps"):
        _capture(tiny_pipe, reducers, root, root.parent, num_inference_steps=7)


def test_random_seed_is_drawn_once_and_reused_on_resume(tiny_pipe, tmp_path):
    root = tmp_path / "capture"
    cfg = CaptureConfig(num_images_per_prompt=1, batch_size=2, num_inference_steps=2, seed=None)
    run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, PROMPTS[:4], root, tmp_path, cfg,
                stop_after_batches=1)
    seeds_first = pl.read_parquet(root / "generations" / "batch_00000.parquet")["seed"].to_list()
    result = run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, PROMPTS[:4], root, tmp_path, cfg)
    base = result.summary["plan"]["base_seed"]
    seeds = pl.read_parquet(root / "generations.parquet")["seed"].to_list()
    assert seeds[:2] == seeds_first and seeds == [generation_seed(base, g) for g in range(4)]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="shard_index"):
        CaptureConfig(shard_index=2, num_shards=2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        CaptureConfig(num_inference_steps=0)


def test_capture_keeps_sae_training_vectors_without_changing_the_record(tiny_pipe, reducers, reference, tmp_path):
    """``sae_vectors``: every position's channel vector is kept per batch; their mean is the recorded value."""
    from safetensors.torch import load_file

    from ddr_core.sae_training import VECTORS_DIRNAME, load_vectors

    reference_root, _ = reference
    root = tmp_path / "capture"
    result = _capture(tiny_pipe, reducers, root, tmp_path, sae_vectors=True)
    assert result.summary["complete"]
    for half in ("conditional", "unconditional"):
        ids, values = _dense(root, "tiny-raw", half)
        ref_ids, ref_values = _dense(reference_root, "tiny-raw", half)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(values, ref_values)  # collecting vectors changes nothing recorded
    files = sorted((root / VECTORS_DIRNAME).glob("batch_*.safetensors"))
    assert len(files) == 3
    ids, values = _dense(root, "tiny-raw", "conditional")
    timesteps = sorted(result.summary["timesteps"], reverse=True)
    checked = 0
    for file in files:
        batch = load_file(file)
        for generation in batch["generation_ids"].unique().tolist():
            for step, timestep in enumerate(timesteps):
                rows = ((batch["generation_ids"] == generation) & (batch["timesteps"] == timestep)
                        & (batch["halves"] == 1))
                mean = batch["vectors"][rows].float().mean(dim=0).numpy()
                row = int(np.flatnonzero(ids == generation)[0])
                np.testing.assert_allclose(mean, values[row, step], rtol=2e-3, atol=2e-3)  # store: float16
                checked += 1
    assert checked == 10 * 6
    loaded = load_vectors([root / VECTORS_DIRNAME], TINY_TARGET_LAYER)
    assert loaded.width == 64 and sorted(set(loaded.generation_ids.tolist())) == list(range(10))


def test_a_shard_writes_nothing_while_another_shard_cleans_up(tiny_pipe, reducers, reference, tmp_path):
    """A shard that finds another holding the group lock exclusively (that one is removing a killed run's
    temporaries) writes nothing, not even its plan candidate, until the lock is shared again: otherwise the
    clean-up deletes the candidate mid-write ("could not write ... .candidate: No such file or directory",
    seen with two ranks under load)."""
    import threading
    import time

    from ddr_core.activations import GROUP_LOCK_FILE, PLAN_FILE, shard_lock_path
    from ddr_core.locks import OwnedFlock

    ref_root, _ = reference
    root = tmp_path / "capture"
    root.mkdir()
    cleaner = OwnedFlock(root / GROUP_LOCK_FILE, owner="shard 0 cleaning up").acquire()
    outcome: dict = {}

    def shard_one() -> None:
        try:
            outcome["result"] = _capture(tiny_pipe, reducers, root, tmp_path, shard_index=1, num_shards=2)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=shard_one)
    thread.start()
    deadline = time.monotonic() + 60
    while not shard_lock_path(root, 1, 2).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the shard has its shard lock and is past the point where it would write its plan
    written = sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock"))
    assert written == [] and thread.is_alive()
    cleaner.release()
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].batches_done == [1] and (root / PLAN_FILE).is_file()
    ref_ids, ref_values = _dense(ref_root, "tiny-raw")
    ids, values = _dense(root, "tiny-raw")
    keep = np.isin(ref_ids, ids)
    np.testing.assert_allclose(values, ref_values[keep], rtol=1e-3, atol=1e-3)


def test_bad_sizes_are_refused_before_anything_is_written(tiny_pipe, reducers, tmp_path):
    """``height: 12`` / ``num_inference_steps: 100000`` / a 65536-pixel side are refused when the config is
    read; what only the model knows (its VAE scale, its scheduler's train steps) before the store exists."""
    from types import SimpleNamespace

    from ddr_core.activations import check_capture_sizes

    for field, value, message in (("height", 12, "multiple of 8"), ("width", 65536, "less than or equal"),
                                  ("num_inference_steps", 100000, "less than or equal"),
                                  ("batch_size", 100000, "less than or equal")):
        with pytest.raises(ValueError, match=message) as error:
            CaptureConfig(**{field: value})
        assert field in str(error.value)
    coarse = SimpleNamespace(vae_scale_factor=16, num_train_timesteps=100,  # what a ModelFamily tells
                             latent_shape=lambda height, width: (4, height // 16, width // 16))
    with pytest.raises(ValueError, match="height 40 is not a multiple of the model's VAE scale factor 16: use 32 or 48"):
        check_capture_sizes(coarse, 40, 64, 10)
    with pytest.raises(ValueError, match="num_inference_steps 101 exceeds the scheduler's 100 train timesteps"):
        check_capture_sizes(coarse, 64, 64, 101)
    check_capture_sizes(as_model(tiny_pipe), 64, 64, 1000)


def test_a_plan_that_never_got_a_generation_is_replaced(tiny_pipe, reducers, reference, tmp_path):
    """A run that fixed its plan and then failed before its first generation does not poison the folder: the
    corrected run replaces the plan (one with generations is still protected by CapturePlanMismatch)."""
    from ddr_core.activations import PLAN_FILE, CapturePlan, fix_plan

    root = tmp_path / "capture"
    fix_plan(root, CapturePlan(prompts=PROMPTS, num_images_per_prompt=2, batch_size=4, base_seed=7,
                               num_inference_steps=3, guidance_scale=7.5, height=24, width=24,
                               variants={"tiny-raw": {}, "tiny-sae": {}}))
    assert json.loads((root / PLAN_FILE).read_text())["height"] == 24
    result = _capture(tiny_pipe, reducers, root, tmp_path)
    assert result.summary["complete"] and json.loads((root / PLAN_FILE).read_text())["num_inference_steps"] == 6
    ref_root, _ = reference
    np.testing.assert_allclose(_dense(root, "tiny-raw")[1], _dense(ref_root, "tiny-raw")[1], rtol=1e-3, atol=1e-3)
    with pytest.raises(CapturePlanMismatch):
        _capture(tiny_pipe, reducers, root, tmp_path, num_inference_steps=5)
