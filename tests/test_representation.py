"""Shards and index of the representation stage, on hand-made upstream outputs (tests/representation_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from ddr_core import representation as rep
from ddr_core.paths import DataLayout
from tests.representation_data import (
    FREQUENCY,
    LONG_NAME,
    NUL_NAME,
    OBSERVED,
    VARIANT,
    WIDTH,
    make_toy_data_root,
)


@pytest.fixture()
def toy(tmp_path: Path):
    return make_toy_data_root(tmp_path / "data")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_build_shards_writes_every_section(toy) -> None:
    summary = rep.build_shards(toy.layout, VARIANT)
    assert summary.channels == list(range(WIDTH))
    assert summary.active_channels == [0, 1, 2, 3]
    assert summary.with_priors == [0, 1]
    assert summary.with_dreams == {"noise": [0], "no_noise": [0]}
    assert summary.errors == {}

    path = rep.shard_path(toy.layout, VARIANT, 0)
    shard = json.loads(path.read_text())
    assert shard["format"] == rep.SHARD_FORMAT and shard["channel"] == 0 and shard["variant"] == VARIANT
    assert shard["observed_timesteps"] == OBSERVED
    assert shard["observed"]["frequency"] == FREQUENCY[0]
    assert [p["timestep"] for p in shard["peaks"]] == [501]
    assert shard["peaks"][0]["height"] == pytest.approx(0.8)
    # 3 observed timesteps with frequency > 0, two examples each, newest (highest t) first
    assert [e["timestep"] for e in shard["examples"]] == [701, 701, 501, 501, 301, 301]
    assert all(e["prompt"] and e["image"].startswith("outputs/default/activations/toy/images/")
               for e in shard["examples"])
    assert shard["priors"]["status"] == "done"
    assert [i["seed"] for i in shard["priors"]["images"]] == [7, 8]
    assert [i["verdict"] for i in shard["priors"]["images"]] == [  # against the unsteered generation, as text
        "vs unsteered: raised (gain 1 vs noise 0.141)", "vs unsteered: not raised (gain 0.01 vs noise 0.141)"]
    assert shard["priors"]["latents"].endswith("priors/toy-raw/channel_00000/latents.safetensors")

    noise = shard["dreams"]["noise"]
    # only raised dreams are dreams; the failed one is listed apart with its reason, without its image
    assert [(r["timestep"], r["seed"]) for r in noise["results"]] == [(501, 11), (501, 22), (0, 11)]
    assert [(r["timestep"], r["seed"], r["verdict"]) for r in noise["not_raised"]] == [
        (0, 22, "failed: non-finite loss")]
    assert "image" not in noise["not_raised"][0] and noise["skipped_timesteps"] == []
    assert noise["results"][0]["verdict"].startswith("raised (gain 7.49 vs noise 0.00778")
    first = noise["results"][0]
    assert [s["step"] for s in first["steps"]] == [0, 5, 10]
    # snapshot n carries the statistics of step n (the final snapshot, step 10, those of the last step 9)
    assert [s["stats_step"] for s in first["steps"]] == [0, 5, 9]
    assert first["steps"][1]["activation"] == pytest.approx(5 + 11 / 100)
    assert first["final_stats"]["loss"] == pytest.approx(-9.0)
    assert first["final_activation"] == pytest.approx(9.5)
    assert [(r["timestep"], r["seed"]) for r in shard["dreams"]["no_noise"]["results"]] == [(501, 11), (501, 22)]
    assert len(shard["quality"]["noise"]) == 4 and len(shard["quality"]["no_noise"]) == 2
    assert [q["raised"] for q in shard["quality"]["noise"]] == [True, True, True, False]  # the verdict, written
    assert shard["visualised_timesteps"] == [501, 0]
    assert shard["timesteps_with_data"] == [701, 501, 301, 0]

    # every path is relative to the data root and points at an existing file
    paths = [s for s in _strings(shard) if s.startswith("outputs/")]
    assert len(paths) > 30
    for relative in paths:
        assert not relative.startswith("/")
        assert rep.resolve_file(toy.data_root, relative).is_file()

    inactive = json.loads(rep.shard_path(toy.layout, VARIANT, 4).read_text())
    assert inactive["summary"]["is_active"] is False and inactive["peaks"] == []
    assert inactive["priors"]["status"] == "skipped" and inactive["priors"]["reason"] == "inactive"
    assert inactive["dreams"] == {"noise": None, "no_noise": None}
    assert not list(toy.layout.outputs_dir.rglob("*.pkl"))


def test_curves_are_interpolated_onto_every_timestep(toy) -> None:
    rep.build_shards(toy.layout, VARIANT, [2])
    shard = rep.load_shard(toy.layout, VARIANT, 2, build_if_missing=False)
    curves = rep.load_curves(toy.layout, shard)
    assert curves["timestep"].to_list() == list(range(1000))
    activity = curves["activity"].to_numpy()
    for t, f in zip(OBSERVED, FREQUENCY[2], strict=True):
        assert activity[t] == pytest.approx(f)
    assert activity[201] == pytest.approx((0.3 + 0.1) / 2)  # halfway between 101 and 301
    assert activity[999] == pytest.approx(activity[901])  # edges held like np.interp
    maxima = curves["max_activation"].to_numpy()
    assert maxima[501] == pytest.approx(3.0) and np.all(np.isfinite(maxima))
    # a shard built in memory (no curve table) gives the same curves
    in_memory = rep.make_shards(toy.layout, VARIANT, [2])[2]
    assert in_memory["curves"] is None
    assert rep.load_curves(toy.layout, in_memory).equals(curves)


def test_priors_and_dreams_are_optional(tmp_path: Path) -> None:
    toy = make_toy_data_root(tmp_path / "data", priors=False, dreams=False)
    summary = rep.build_shards(toy.layout, VARIANT, [0, 1])
    assert summary.with_priors == [] and summary.with_dreams == {"noise": [], "no_noise": []}
    shard = rep.load_shard(toy.layout, VARIANT, 0)
    assert shard["priors"] is None and shard["dreams"] == {"noise": None, "no_noise": None}
    assert shard["quality"] == {} and shard["visualised_timesteps"] == []
    index = rep.make_index_table(toy.layout, VARIANT)
    assert not index["has_priors"].any() and not index["has_dreams"].any()
    assert index["n_dreams"].to_list() == [0] * WIDTH


def test_missing_file_is_recorded_or_raised_naming_it(toy) -> None:
    missing = toy.layout.stage_dir("priors", VARIANT) / "channel_00001" / "seed_8.png"
    missing.unlink()
    relative = toy.layout.relative(missing.parent) + "/seed_8.png"
    summary = rep.build_shards(toy.layout, VARIANT, [0, 1])
    assert summary.errors == {1: [{"file": relative, "what": "prior image", "problem": "missing"}]}
    assert rep.load_shard(toy.layout, VARIANT, 1)["errors"] == summary.errors[1]
    with pytest.raises(rep.ShardFileError, match=r"channel 1: prior image .*seed_8\.png.* is missing"):
        rep.build_shards(toy.layout, VARIANT, [1], strict=True)


def test_crafted_path_is_refused(toy) -> None:
    examples_file = toy.layout.timestep_stats_dir(VARIANT) / "dataset_examples.parquet"
    examples = pl.read_parquet(examples_file)
    examples = examples.with_columns(
        pl.when((pl.col("channel") == 0) & (pl.col("rank") == 0) & (pl.col("timestep") == 501))
        .then(pl.lit("../../etc/passwd")).otherwise(pl.col("image_path")).alias("image_path")
    )
    examples.write_parquet(examples_file)
    summary = rep.build_shards(toy.layout, VARIANT, [0])
    assert summary.errors[0] == [
        {"file": "../../etc/passwd", "what": "dataset example image", "problem": "escapes the data root"}
    ]
    for crafted in ("../../etc/passwd", "/etc/passwd", "outputs/../../../etc/passwd"):
        with pytest.raises(rep.ShardFileError, match="refused: it escapes the data root"):
            rep.resolve_file(toy.data_root, crafted)
    assert rep.try_resolve_file(toy.data_root, "../../etc/passwd") is None
    # a link inside the data root that points outside is refused as well
    link = toy.data_root / "outputs" / "link.png"
    link.symlink_to("/etc/passwd")
    with pytest.raises(rep.ShardFileError, match="escapes"):
        rep.resolve_file(toy.data_root, "outputs/link.png")
    with pytest.raises(rep.ShardFileError, match="refused"):
        rep.build_shards(toy.layout, VARIANT, [0], strict=True)


def test_index_is_duckdb_queryable(toy) -> None:
    rep.build_shards(toy.layout, VARIANT, [0, 1, 2, 3])
    path = rep.build_index(toy.layout, VARIANT)
    index = pl.read_parquet(path)
    assert tuple(index.columns) == rep.INDEX_COLUMNS
    assert index["channel"].to_list() == list(range(WIDTH))
    assert index["is_active"].to_list() == [True, True, True, True, False, False]
    assert index["peak_timesteps"].to_list()[3] == [101, 950]
    assert index["top_peak_timestep"].to_list()[:4] == [501, 950, 0, 101]
    assert index["has_priors"].to_list() == [True, True, False, False, False, False]  # 4 is skipped
    assert index["has_dreams"].to_list()[:2] == [True, False]
    assert index["has_shard"].to_list() == [True, True, True, True, False, False]
    row = index.row(0, named=True)
    assert row["n_dreams"] == 3 and row["n_not_raised_dreams"] == 1 and row["n_failed_dreams"] == 1
    assert row["dream_ratio_mean"] == pytest.approx(1.9) and row["n_examples"] == 6
    assert len(row["top_prompts"]) == 5 and row["top_prompts_text"].count(" | ") == 4

    summary = json.loads((path.parent / "index.json").read_text())
    assert summary["total_channels"] == WIDTH and summary["active_channels"] == 4
    assert summary["timesteps"] == OBSERVED and summary["channels_with_dreams"] == 1

    examples = pl.read_parquet(toy.layout.timestep_stats_dir(VARIANT) / "dataset_examples.parquet")
    with_sofa = sorted(set(examples.filter(pl.col("prompt").str.contains("sofa"))["channel"].to_list()))
    assert 0 < len(with_sofa) < 4
    found = duckdb.sql(
        f"select channel from read_parquet('{path}') where is_active and top_prompts_text ilike '%SOFA%' "
        "order by channel"
    ).fetchall()
    # only the 5 best distinct prompts per channel are in the index, so a match is a subset
    assert found and set(c for (c,) in found) <= set(with_sofa)
    assert all(text == " | ".join(prompts) for text, prompts in zip(index["top_prompts_text"], index["top_prompts"],
                                                                     strict=True))


def test_search_channels_by_prompt(toy) -> None:
    result = rep.search_channels(toy.layout, VARIANT, "CAT")
    assert set(result["channel"].to_list()) == {0, 1, 2, 3}
    assert all("cat" in p for p in result["prompt"].to_list())
    examples = pl.read_parquet(toy.layout.timestep_stats_dir(VARIANT) / "dataset_examples.parquet")
    expected = (examples.filter(pl.col("prompt").str.contains("submarine")).group_by("channel")
                .agg(pl.len().alias("n"), pl.col("activation").max().alias("best"))
                .sort(["n", "best", "channel"], descending=[True, True, False]))
    assert rep.search_channels(toy.layout, VARIANT, "submarine")["channel"].to_list() == expected["channel"].to_list()
    assert rep.search_channels(toy.layout, VARIANT, "100%").height == 0  # '%' is literal


def test_bad_inputs_name_the_fix(tmp_path: Path, toy) -> None:
    empty = DataLayout(tmp_path / "empty")
    with pytest.raises(rep.MissingStatsError, match=r"materialize timestep_stats\[toy-raw\] first"):
        rep.build_shards(empty, VARIANT)
    with pytest.raises(IndexError, match="outside 0..5"):
        rep.build_shards(toy.layout, VARIANT, [6])
    with pytest.raises(ValueError, match="not below the data root"):
        rep.build_shards(toy.layout, VARIANT, [0], out_dir=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not a representation shard"):
        rep.check_shard({"format": "pickle"})
    assert rep.list_variants(toy.layout) == [VARIANT]


def test_unusable_paths_are_recorded_not_fatal(toy) -> None:
    """A NUL byte, an over-long name or a non-string where the statistics name an image: recorded in the shard's
    errors (escaped), not an exception; strict mode raises ShardFileError naming it."""
    examples_file = toy.layout.timestep_stats_dir(VARIANT) / "dataset_examples.parquet"
    examples = pl.read_parquet(examples_file)
    first = (pl.col("channel") == 0) & (pl.col("timestep") == 501)
    examples.with_columns(
        pl.when(first & (pl.col("rank") == 0)).then(pl.lit(NUL_NAME))
        .when(first & (pl.col("rank") == 1)).then(pl.lit(LONG_NAME)).otherwise(pl.col("image_path"))
        .alias("image_path")).write_parquet(examples_file)
    summary = rep.build_shards(toy.layout, VARIANT, [0])
    assert [(e["file"], e["problem"]) for e in summary.errors[0]] == [(NUL_NAME, "unusable name"),
                                                                      (LONG_NAME, "unusable name")]
    with pytest.raises(rep.ShardFileError, match=r"'outputs/default/activations/toy/images/gen\\x00\.png' refused: "
                                                 "it contains a NUL byte"):
        rep.resolve_file(toy.data_root, NUL_NAME, "image")
    with pytest.raises(rep.ShardFileError, match=r"\(312 characters\) cannot be looked up: File name too long"):
        rep.resolve_file(toy.data_root, LONG_NAME, "image")
    with pytest.raises(rep.ShardFileError, match="not a path but a int"):
        rep.resolve_file(toy.data_root, 5, "image")  # type: ignore[arg-type]
    assert rep.try_resolve_file(toy.data_root, NUL_NAME) is None
    with pytest.raises(rep.ShardFileError, match="channel 0: dataset example image .* NUL byte"):
        rep.build_shards(toy.layout, VARIANT, [0], strict=True)


def test_bad_shard_curve_and_index_files_raise_naming_the_file(toy) -> None:
    """Readers check what they read: a truncated, mistyped or misplaced shard, an unreadable curve table or
    index raise BadShardError naming the file, the wrong fields and the fix (never a bare TypeError later)."""
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    path = rep.shard_path(toy.layout, VARIANT, 1)
    good = path.read_text()
    path.write_text(good[:80])
    with pytest.raises(rep.BadShardError, match=rf"shard {path} is not valid JSON .* rebuild it with build_shards"):
        rep.load_shard(toy.layout, VARIANT, 1)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(rep.BadShardError, match="is not UTF-8"):
        rep.load_shard(toy.layout, VARIANT, 1)
    for change, field in (({"peaks": [{"rank": 0, "timestep": "late", "height": 1.0}]}, "peaks.0.timestep"),
                          ({"examples": [{"timestep": 501, "rank": 0, "image": 7}]}, "examples.0.image"),
                          ({"total_timesteps": 0}, "total_timesteps"),
                          ({"observed": {"timestep": [1, 2], "frequency": [0.5], "max_activation": [None]}},
                           "observed"),
                          ({"dreams": {"noise": {"results": [{"timestep": 1}]}}}, "dreams.noise.results.0.seed")):
        path.write_text(json.dumps({**json.loads(good), **change}))
        with pytest.raises(rep.BadShardError, match=rf"{path} has fields of the wrong type: {field}"):
            rep.load_shard(toy.layout, VARIANT, 1)
    path.write_text(rep.shard_path(toy.layout, VARIANT, 2).read_text())
    with pytest.raises(rep.BadShardError, match="holds channel 2, not channel 1"):
        rep.load_shard(toy.layout, VARIANT, 1)
    path.write_text(good)
    shard = rep.load_shard(toy.layout, VARIANT, 1)
    assert isinstance(shard["total_timesteps"], int) and shard["priors"]["images"][0]["seed"] == 7

    curves = toy.data_root / shard["curves"]
    curves.write_bytes(curves.read_bytes()[:50])
    with pytest.raises(rep.BadShardError, match=rf"curve table {curves} cannot be read"):
        rep.load_curves(toy.layout, shard)
    frame, problem = rep.curves_or_observed(toy.layout, shard)
    assert frame.equals(rep.observed_curves(shard)) and "observed points" in problem

    index_file = rep.representation_dir(toy.layout, VARIANT) / "index.parquet"
    index_file.write_bytes(index_file.read_bytes()[:100])
    with pytest.raises(rep.BadShardError, match=rf"index {index_file} cannot be read"):
        rep.load_index(toy.layout, VARIANT)
    frame, problem = rep.load_index_or_rebuild(toy.layout, VARIANT)
    assert frame.height == WIDTH and "rebuilt in memory" in problem
    pl.DataFrame({"channel": [0, 0]}).write_parquet(index_file)
    with pytest.raises(rep.BadShardError, match="lacks the column"):
        rep.load_index(toy.layout, VARIANT)


# --- reliability: disk full, kill -9, concurrent runs ----------------------------------------------------


def _shards_on_disk(layout: DataLayout) -> dict[str, dict]:
    out = rep.representation_dir(layout, VARIANT)
    return {path.name: rep.check_shard(json.loads(path.read_text())) for path in sorted(out.glob("channel_*.json"))}


def _temporaries(layout: DataLayout) -> list[Path]:
    from ddr_core.atomic import is_temp_name

    return [p for p in rep.representation_dir(layout, VARIANT).rglob("*") if is_temp_name(p.name)]


def test_disk_full_at_any_write_leaves_complete_files_and_a_rerun_finishes(toy, monkeypatch) -> None:
    """ENOSPC at every single file replacement in turn (claims, curves, shards, index): the run fails naming
    the error, every shard on disk is complete and equal to a clean build's, no temporary is left, and a
    re-run finishes."""
    import errno
    import os

    from ddr_core import atomic
    from tests.test_failure_modes import FaultyOs

    rep.representation_for_variant(toy.layout, VARIANT)
    reference = _shards_on_disk(toy.layout)
    counter = FaultyOs(fail_on=None)
    monkeypatch.setattr(atomic, "os", counter)
    rep.representation_for_variant(toy.layout, VARIANT)
    total = counter.replace_calls
    assert total >= 2 * WIDTH + 2
    for fail_on in range(1, total + 1):
        monkeypatch.setattr(atomic, "os", FaultyOs(fail_on))
        with pytest.raises(OSError) as error:
            rep.representation_for_variant(toy.layout, VARIANT)
        assert error.value.errno == errno.ENOSPC and "No space left on device" in str(error.value)
        monkeypatch.setattr(atomic, "os", os)
        assert _shards_on_disk(toy.layout) == reference, fail_on
        assert pl.read_parquet(rep.representation_dir(toy.layout, VARIANT) / "index.parquet").height == WIDTH
        assert not _temporaries(toy.layout), fail_on
    rep.representation_for_variant(toy.layout, VARIANT)
    assert _shards_on_disk(toy.layout) == reference


KILLED_RUN = """
import os, sys, time
from pathlib import Path
from ddr_core import atomic, representation
from ddr_core.paths import DataLayout

class Stuck:
    def __getattr__(self, name):
        return getattr(os, name)
    def replace(self, src, dst):
        if Path(dst).name == "channel_00002.json":  # hang with channel 2's shard in its temporary
            print("stuck", flush=True)
            time.sleep(600)
        os.replace(src, dst)

atomic.os = Stuck()
representation.representation_for_variant(DataLayout(Path(sys.argv[1])), "toy-raw", [0, 1, 2, 3],
                                          lock_owner="the killed run")
"""


def test_kill_9_mid_build_then_rerun_and_runs_side_by_side(toy) -> None:
    """A run killed with channel 2's shard in its temporary: meanwhile a run on its channels fails at once
    naming it and a run on other channels finishes beside it; after the kill the re-run removes the
    temporary and writes the same shards as a clean build."""
    import signal
    import subprocess
    import sys

    from ddr_core.locks import ChannelsLockedError

    clean_root = toy.layout.data_root.parent / "clean"
    clean = make_toy_data_root(clean_root)
    rep.representation_for_variant(clean.layout, VARIANT)
    reference = _shards_on_disk(clean.layout)

    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(toy.layout.data_root)], cwd=root,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "stuck"
        with pytest.raises(ChannelsLockedError, match="the killed run"):
            rep.representation_for_variant(toy.layout, VARIANT, [2])
        side = rep.build_shards(toy.layout, VARIANT, [4, 5])
        assert side.channels == [4, 5]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    left = _temporaries(toy.layout)
    assert [p.name.split(".tmp-")[0] for p in left] == [".channel_00002.json"]
    rep.representation_for_variant(toy.layout, VARIANT, [0, 1, 2, 3])
    assert not _temporaries(toy.layout)
    assert _shards_on_disk(toy.layout) == reference
