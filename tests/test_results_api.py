"""The notebook API (ddr_core.results) on the tiny graph's outputs, and the example script that uses it."""

from __future__ import annotations

import json

import polars as pl
import pytest

from ddr_core.representation import ShardFileError
from ddr_core.results import Results


@pytest.fixture(scope="module")
def results(tiny_graph) -> Results:
    data_root, _, _ = tiny_graph
    return Results(data_root, "default")


def test_results_read_statistics_channels_and_images_without_dagster(results: Results) -> None:
    assert results.variants() == ["tiny-raw", "tiny-sae"]
    assert results.summary("tiny-raw")["width"] == 64
    channels = results.channels("tiny-raw")
    assert channels.height == 64 and {"channel", "max_activation", "max_frequency"} <= set(channels.columns)
    assert results.statistics("tiny-raw", "channels").height == 64
    with pytest.raises(ValueError, match="unknown statistics table 'stats'"):
        results.statistics("tiny-raw", "stats")
    examples = results.examples("tiny-raw", 1)
    shard = results.shard("tiny-raw", 1)
    assert examples.height == len(shard["examples"]) >= 1
    assert examples["prompt"].to_list() == [e["prompt"] for e in shard["examples"]]
    priors, dreams = results.priors("tiny-raw", 1), results.dreams("tiny-raw", 1)
    assert priors["seed"].to_list() == [11, 12]
    # 3 timesteps x 2 seeds (tiny_graph config), of which the raised ones are dreams; the others are listed apart
    not_raised = shard["dreams"]["noise"]["not_raised"]
    assert dreams.height + len(not_raised) == 6 and dreams.height >= 1 and set(dreams["run"]) == {"noise"}
    image = results.image(dreams["image"][0])
    assert image.size == (64, 64)
    assert results.curves("tiny-raw", 1).height == results.shard("tiny-raw", 1)["total_timesteps"] == 1000
    assert results.concepts("tiny-raw") is None  # tiny prompts carry no labels


def test_a_path_out_of_the_data_root_is_refused(results: Results) -> None:
    with pytest.raises(ShardFileError, match="escapes the data root"):
        results.image("../../etc/passwd")


def test_concept_verdicts_join_the_channel_table(results: Results, tmp_path) -> None:
    from ddr_core.feature_concepts import TABLE_FILE, feature_concepts_dir

    folder = feature_concepts_dir(results.layout, "tiny-raw")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        pl.DataFrame({"channel": [1, 2], "concept": ["colour", ""], "n_concepts": [1, 0]}).write_parquet(
            folder / TABLE_FILE)
        joined = results.channels("tiny-raw").filter(pl.col("channel").is_in([1, 2, 3])).sort("channel")
        assert joined["concept"].to_list() == ["colour", "", None]
    finally:
        (folder / TABLE_FILE).unlink()


def test_the_example_script_runs(tiny_graph, tmp_path, capsys) -> None:
    import runpy
    import sys

    data_root, _, _ = tiny_graph
    saved = tmp_path / "dream.png"
    argv = sys.argv
    sys.argv = ["notebook_api.py", str(data_root), "--experiment", "default", "--save", str(saved)]
    try:
        runpy.run_path("examples/notebook_api.py", run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "== tiny-raw: 64 channels" in out and "dreams" in out
    assert saved.is_file() and saved.stat().st_size > 0
    json.dumps(out)  # plain text


def test_cfg_contrast_tables_and_their_errors(results: Results) -> None:
    channels = results.cfg_contrast("tiny-raw")
    assert channels.height == results.channels("tiny-raw").height and "verdict" in channels.columns
    profiles = results.cfg_contrast("tiny-raw", "profiles")
    assert profiles.height == channels.height * profiles["timestep"].n_unique()
    with pytest.raises(ValueError, match="choose one of channels, profiles"):
        results.cfg_contrast("tiny-raw", "peaks")
    with pytest.raises(FileNotFoundError, match=r"materialize cfg_contrast\[tiny-sae\] first"):
        results.cfg_contrast("tiny-sae")
