"""Hand-made inputs of the representation stage, in the on-disk formats of the upstream stages.

:func:`make_toy_data_root` writes, under a data root, a variant ``toy-raw`` of 6 channels with
observed timesteps ``901, 701, 501, 301, 101, 1``: the timestep statistics tables (as
``ddr_core.statistics`` writes them), generated images, priors (``prior.json`` + PNGs + latents),
a ``"noise"`` dreams run and a ``"no_noise"`` run (``dream.json``, final and step PNGs, ``stats.parquet``,
``quality.parquet``). Channels 0-3 are active, 4-5 inactive; channel 0 has priors and dreams in both
runs, channel 1 priors only, channel 4 a skipped prior.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from ddr_core.paths import DataLayout
from ddr_core.statistics import find_activity_peaks, interpolate_profile

VARIANT = "toy-raw"
OBSERVED = [901, 701, 501, 301, 101, 1]
TOTAL = 1000
WIDTH = 6
PROMPTS = ["a red cat on a sofa", "a blue dog in snow", "a green tree at dawn", "a castle made of glass",
           "an orange cat sleeping", "a yellow submarine"]
DREAM_SEEDS = [11, 22]
DREAM_STEPS = 10


@dataclass
class ToyData:
    layout: DataLayout
    variant: str = VARIANT

    @property
    def data_root(self) -> Path:
        return self.layout.data_root


def _png(path: Path, colour: tuple[int, int, int], size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[...] = colour
    array[: size // 2, : size // 2] = (255 - colour[0], 255 - colour[1], 255 - colour[2])
    Image.fromarray(array).save(path, format="PNG")


def _latents(path: Path, n: int) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": np.zeros((n, 4, 4, 4), dtype=np.float32), "seeds": np.arange(n, dtype=np.int64)},
              str(path))


# frequency per channel at OBSERVED (0 = not in top-k)
FREQUENCY = {
    0: [0.0, 0.2, 0.8, 0.4, 0.0, 0.0],
    1: [0.9, 0.5, 0.0, 0.0, 0.0, 0.0],
    2: [0.0, 0.0, 0.0, 0.1, 0.3, 0.6],
    3: [0.1, 0.0, 0.0, 0.0, 0.5, 0.0],
    4: [0.0] * 6,
    5: [0.0] * 6,
}


def make_toy_data_root(data_root: Path, experiment: str = "default", priors: bool = True,
                       dreams: bool = True, quality: bool = True) -> ToyData:
    """``quality``: write each dream run's ``quality.parquet`` (without it no dream is raised, none shown)."""
    layout = DataLayout(data_root, experiment)
    stats = layout.timestep_stats_dir(VARIANT)
    stats.mkdir(parents=True)
    # generated images
    image_paths = []
    for gid, _prompt in enumerate(PROMPTS):
        path = layout.activations_dir("toy") / "images" / f"gen_{gid:05d}.png"
        _png(path, ((40 * gid) % 256, 100, 200))
        image_paths.append(layout.relative(path))

    channels_rows, freq_rows, max_rows, active_rows, peak_rows, example_rows = [], [], [], [], [], []
    for c in range(WIDTH):
        freq = np.array(FREQUENCY[c])
        for t, f in zip(OBSERVED, freq, strict=True):
            if f > 0:
                freq_rows.append({"channel": c, "timestep": t, "count": int(f * 10), "frequency": float(f)})
            max_rows.append({"channel": c, "timestep": t, "max_activation": float(1.0 + c + f * 3)})
        profile = interpolate_profile(np.array(OBSERVED), freq, TOTAL)
        active = np.nonzero(profile > 0)[0]
        for t in active:
            active_rows.append({"channel": c, "timestep": int(t), "frequency": float(profile[t])})
        peaks = find_activity_peaks(profile, 0.0, 100, 3)
        for rank, (t, h, s, e) in enumerate(peaks):
            nearest = min(OBSERVED, key=lambda o, t=t: (abs(o - t), -o))
            peak_rows.append({"channel": c, "peak_rank": rank, "timestep": t, "height": h, "plateau_start": s,
                              "plateau_end": e, "observed_timestep": nearest})
        for t, f in zip(OBSERVED, freq, strict=True):
            if f > 0:
                for rank in range(2):
                    gid = (c + rank + t) % len(PROMPTS)
                    example_rows.append({"channel": c, "timestep": t, "rank": rank, "generation_id": gid,
                                         "activation": float(5.0 + c - rank + f), "prompt": PROMPTS[gid],
                                         "image_path": image_paths[gid]})
        channels_rows.append({
            "channel": c, "is_active": bool(active.size), "n_active_timesteps": int(active.size),
            "total_frequency": float(freq.sum()), "max_frequency": float(freq.max()),
            "max_activation": float(1.0 + c + freq.max() * 3),
            "first_active_timestep": int(active[0]) if active.size else None,
            "last_active_timestep": int(active[-1]) if active.size else None, "n_peaks": len(peaks),
        })
    schemas = {
        "channels": {"channel": pl.Int32, "is_active": pl.Boolean, "n_active_timesteps": pl.Int32,
                     "total_frequency": pl.Float64, "max_frequency": pl.Float64, "max_activation": pl.Float32,
                     "first_active_timestep": pl.Int32, "last_active_timestep": pl.Int32, "n_peaks": pl.Int32},
        "frequency": {"channel": pl.Int32, "timestep": pl.Int32, "count": pl.Int64, "frequency": pl.Float64},
        "max_activation": {"channel": pl.Int32, "timestep": pl.Int32, "max_activation": pl.Float32},
        "active_timesteps": {"channel": pl.Int32, "timestep": pl.Int32, "frequency": pl.Float64},
        "activity_peaks": {"channel": pl.Int32, "peak_rank": pl.Int32, "timestep": pl.Int32, "height": pl.Float64,
                           "plateau_start": pl.Int32, "plateau_end": pl.Int32, "observed_timestep": pl.Int64},
        "dataset_examples": {"channel": pl.Int32, "timestep": pl.Int32, "rank": pl.Int32,
                             "generation_id": pl.Int64, "activation": pl.Float32, "prompt": pl.String,
                             "image_path": pl.String},
    }
    for name, rows in (("channels", channels_rows), ("frequency", freq_rows), ("max_activation", max_rows),
                       ("active_timesteps", active_rows), ("activity_peaks", peak_rows),
                       ("dataset_examples", example_rows)):
        pl.DataFrame(rows, schema=schemas[name]).write_parquet(stats / f"{name}.parquet")
    (stats / "summary.json").write_text(json.dumps({
        "variant": VARIANT, "half": "conditional", "config": {"total_timesteps": TOTAL, "top_k": 2},
        "config_hash": "0" * 16, "n_generations": len(PROMPTS), "timesteps": OBSERVED, "width": WIDTH,
        "active_channel_count": 4, "peak_count": len(peak_rows),
    }))

    if priors:
        root = layout.stage_dir("priors", VARIANT)
        for c in (0, 1):
            folder = root / f"channel_{c:05d}"
            images = []
            for seed in (7, 8):
                _png(folder / f"seed_{seed}.png", (200, 50 * c, seed * 10))
                images.append(layout.relative(folder / f"seed_{seed}.png"))
            _latents(folder / "latents.safetensors", 2)
            (folder / "prior.json").write_text(json.dumps({
                "format": 1, "channel": c, "status": "done", "reason": None, "message": None, "seeds": [7, 8],
                "steered_timesteps": [701, 501], "strengths": [3.0, 4.0], "images": images,
                "latents": layout.relative(folder / "latents.safetensors"),
                # channel 0 against its unsteered generations (1.0, 1.2: sd 0.141): gains 1.0 (raised), 0.01 (not)
                **({"activation": {"format": "ddr.prior_gain/1", "timestep": 501, "noise_draws": 1,
                                   "unsteered": [1.0, 1.2], "steered": [2.0, 1.21], "unsteered_draw_sd": [0.0, 0.0],
                                   "steered_draw_sd": [0.0, 0.0]}} if c == 0 else {}),
            }))
        folder = root / "channel_00004"
        folder.mkdir(parents=True)
        (folder / "prior.json").write_text(json.dumps({
            "format": 1, "channel": 4, "status": "skipped", "reason": "inactive", "message": "no active timesteps",
            "seeds": [7, 8], "steered_timesteps": [], "strengths": [], "images": [], "latents": None,
        }))

    if dreams:
        for run, stage, timesteps in (("noise", "dreams", [501, 0]), ("no_noise", "dreams_no_noise", [501])):
            quality_rows = []
            channel_folder = layout.stage_dir(stage, VARIANT) / "channel_00000"
            results, failures = {}, []
            for t in timesteps:
                folder = channel_folder / f"t_{t:04d}"
                rows = []
                for seed in DREAM_SEEDS:
                    _png(folder / f"seed_{seed}.png", (seed * 5, t % 256, 90 if run == "noise" else 20))
                    for step in (0, 5, DREAM_STEPS):
                        _png(folder / "steps" / f"seed_{seed}_step_{step:04d}.png", (step * 20, seed * 5, 60))
                    for step in range(DREAM_STEPS):
                        rows.append({"seed": seed, "step": step, "activation": float(step + seed / 100),
                                     "tv": 0.1, "range": 0.0, "moment": 0.0, "loss": float(-step)})
                pl.DataFrame(rows, schema={"seed": pl.Int64, "step": pl.Int32, "activation": pl.Float64,
                                           "tv": pl.Float64, "range": pl.Float64, "moment": pl.Float64,
                                           "loss": pl.Float64}).write_parquet(folder / "stats.parquet")
                _latents(folder / "latents.safetensors", len(DREAM_SEEDS))
                results[str(t)] = {
                    "seeds": DREAM_SEEDS, "final_activation": [9.5, None if t == 0 else 9.0],
                    "images": [layout.relative(folder / f"seed_{s}.png") for s in DREAM_SEEDS],
                    "latents": layout.relative(folder / "latents.safetensors"),
                }
                if t == 0:
                    failures.append({"channel": 0, "timestep": 0, "seed": 22, "step": 4, "reason": "non-finite loss"})
                for seed in DREAM_SEEDS:  # raised: gain 7.5 over starts 2.0 +- 0.1 (the failed one is not)
                    quality_rows.append({"channel": 0, "timestep": t, "seed": seed, "dream_activation": 9.5,
                                         "prior_activation": 2.0 + seed / 1000, "top_example_activation": 5.0,
                                         "example_timestep": 501, "ratio": 1.9,
                                         "failed": t == 0 and seed == 22})
            (channel_folder / "dream.json").write_text(json.dumps({
                "channel": 0, "timesteps": timesteps, "seeds": DREAM_SEEDS, "results": results,
                "failures": failures, "config": {}, "config_hash": "x",
            }))
            if quality:
                pl.DataFrame(quality_rows, schema={
                    "channel": pl.Int32, "timestep": pl.Int32, "seed": pl.Int64, "dream_activation": pl.Float64,
                    "prior_activation": pl.Float64, "top_example_activation": pl.Float64,
                    "example_timestep": pl.Int32, "ratio": pl.Float64, "failed": pl.Boolean,
                }).write_parquet(layout.stage_dir(stage, VARIANT) / "quality.parquet")
    return ToyData(layout=layout)


def make_indexed_toy(data_root: Path, monkeypatch=None) -> ToyData:
    """:func:`make_toy_data_root` with the representation shards and index built (what the viewers read); with
    ``monkeypatch`` also points ``DDR_DATA_ROOT`` / ``DDR_EXPERIMENT`` at it (the inspector's AppTest reads them)."""
    from ddr_core import representation as rep

    toy = make_toy_data_root(data_root)
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    if monkeypatch is not None:
        monkeypatch.setenv("DDR_DATA_ROOT", str(toy.data_root))
        monkeypatch.setenv("DDR_EXPERIMENT", toy.layout.experiment)
    return toy


def write_feature_concepts(layout: DataLayout) -> None:
    """``feature_concepts`` of the variant as the stage writes them: channel 0 scored (red circle, with prior
    and dream agreement), channel 1 scored without images, channel 2 not scored (too few examples)."""
    from ddr_core.feature_concepts import SUMMARY_FILE, TABLE_FILE, feature_concepts_dir, table_columns

    families = ["colour", "shape"]
    rows = []
    for channel in range(6):
        row = {column: None for column in table_columns(families)}
        row.update({"channel": channel, "basis": "raw", "n_examples": 0, "n_labelled": 0,
                    "n_prior_images": 0, "n_dream_images": 0})
        rows.append(row)
    rows[0].update({"n_examples": 4, "n_labelled": 4, "examples_timestep": 501, "purity": 0.875,
                    "chance_purity": 0.4, "purity_joint": 0.75, "dominant_colour": "red", "purity_colour": 1.0,
                    "chance_purity_colour": 0.3, "dominant_shape": "circle", "purity_shape": 0.75,
                    "chance_purity_shape": 0.5, "n_prior_images": 2, "prior_agreement_colour": 0.5,
                    "prior_agreement_shape": 1.0, "n_dream_images": 4, "dream_agreement_colour": 0.25,
                    "dream_agreement_shape": 0.0, "prior_recognisable": 0.5, "p_colour": 0.0002, "q_colour": 0.001,
                    "p_shape": 0.2, "q_shape": 0.4, "concept": "colour=red", "n_concepts": 1})
    rows[1].update({"n_examples": 3, "n_labelled": 3, "examples_timestep": 901, "purity": 0.5,
                    "chance_purity": 0.4, "purity_joint": 0.33, "dominant_colour": "blue", "purity_colour": 0.67,
                    "chance_purity_colour": 0.3, "dominant_shape": "square", "purity_shape": 0.33,
                    "chance_purity_shape": 0.5, "p_colour": 0.3, "q_colour": 0.45, "p_shape": 0.9, "q_shape": 1.0,
                    "concept": "", "n_concepts": 0})
    rows[2].update({"n_examples": 1, "n_labelled": 1})
    folder = feature_concepts_dir(layout, VARIANT)
    folder.mkdir(parents=True)
    schema = {c: (pl.String if c.startswith(("dominant_", "basis", "concept")) or "_vote_" in c
                  else pl.Int64 if c.startswith("n_") or c in ("channel", "examples_timestep") else pl.Float64)
              for c in table_columns(families, world=True)}
    pl.DataFrame(rows, schema=schema, orient="row").write_parquet(folder / TABLE_FILE)
    (folder / SUMMARY_FILE).write_text(json.dumps({"variant": VARIANT, "basis": "raw", "families": families,
                                                   "config": {"min_examples": 3}}))


LONG_NAME = "outputs/" + "n" * 300 + ".png"  # one component longer than any file system's NAME_MAX (255)
NUL_NAME = "outputs/default/activations/toy/images/gen\x00.png"


def corrupt_toy_data_root(layout: DataLayout) -> dict[str, str]:
    """Damage a built toy data root (shards and index written) in every way a reader must survive; returns
    what was done, by the name a reader reports it under.

    - channel 0: a corrupt PNG (a dream image cut short), a missing prior image, an example image path that
      escapes the data root, and a truncated curve table -- its page must still be written;
    - channel 1: its shard is truncated JSON; channel 2: its shard has wrong field types (skipped);
    - channel 3: an example image path with a NUL byte and one with a name too long for the file system;
    - channel 4 (inactive): its shard deleted though the index lists it (built in memory instead);
    - an index row for channel 99, which the variant does not have (active: selected by default).
    """
    from ddr_core import representation as rep

    shard_0 = json.loads(rep.shard_path(layout, VARIANT, 0).read_text())
    dream_image = layout.data_root / shard_0["dreams"]["noise"]["results"][0]["image"]
    dream_image.write_bytes(dream_image.read_bytes()[:60])
    prior_image = layout.data_root / shard_0["priors"]["images"][1]["image"]
    prior_image.unlink()
    shard_0["examples"][0]["image"] = "../../etc/passwd"
    rep.shard_path(layout, VARIANT, 0).write_text(json.dumps(shard_0))
    curves = layout.data_root / shard_0["curves"]
    curves.write_bytes(curves.read_bytes()[:40])

    shard_1 = rep.shard_path(layout, VARIANT, 1)
    shard_1.write_text(shard_1.read_text()[:150])
    shard_2 = json.loads(rep.shard_path(layout, VARIANT, 2).read_text())
    shard_2["peaks"] = "not a list"
    shard_2["total_timesteps"] = "many"
    rep.shard_path(layout, VARIANT, 2).write_text(json.dumps(shard_2))

    shard_3 = json.loads(rep.shard_path(layout, VARIANT, 3).read_text())
    shard_3["examples"][0]["image"] = NUL_NAME
    shard_3["examples"][1]["image"] = LONG_NAME
    rep.shard_path(layout, VARIANT, 3).write_text(json.dumps(shard_3))

    rep.shard_path(layout, VARIANT, 4).unlink()
    index_file = rep.representation_dir(layout, VARIANT) / "index.parquet"
    index = pl.read_parquet(index_file)
    extra = index.filter(pl.col("channel") == 0).with_columns(pl.lit(99, dtype=pl.Int32).alias("channel"))
    pl.concat([index, extra]).write_parquet(index_file)
    return {"corrupt image": layout.relative(dream_image), "missing image": layout.relative(prior_image),
            "curve table": layout.relative(curves)}
