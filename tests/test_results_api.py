"""The notebook API (ddr_core.results) on the tiny graph's outputs and on small hand-made stage outputs, and the
example script that uses it."""

from __future__ import annotations

import json

import numpy as np
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


# ---- feature_labels and cfg_truth on small real outputs (no tiny graph) ---------------------------------------


def test_results_read_the_feature_labels_the_stage_wrote(tmp_path) -> None:
    """``labels`` / ``labels_summary`` are the stage's own output (a planted red channel labelled ``colour=red``);
    ``None`` for a variant never labelled; an unsafe variant name is refused before it becomes a path."""
    from ddr_core.labels import FeatureLabelsConfig, feature_labels_for_variant
    from ddr_core.labels.toy import ConceptClassifierLabeller
    from ddr_core.paths import UnsafeNameError
    from ddr_core.toy_world import parse_prompt
    from tests.test_feature_concepts import RuleClassifier
    from tests.test_labels import PROMPTS, _hand_made_capture

    project, layout = _hand_made_capture(tmp_path)
    red = sum(parse_prompt(p)["colour"] == "red" for p in PROMPTS)
    table, summary, _ = feature_labels_for_variant(
        project, layout, "toy-raw", FeatureLabelsConfig(n_top=red),
        labeller=ConceptClassifierLabeller(RuleClassifier(), families=["colour", "shape"]))
    results = Results(layout.data_root, "default")
    labels = results.labels("toy-raw")
    assert labels is not None and labels.equals(table) and labels.height == 64
    first = labels.filter(pl.col("channel") == 0).row(0, named=True)
    assert first["label"] == "colour=red" and first["score"] == 1.0 and first["significant"]
    assert results.labels_summary("toy-raw")["scored"] == summary["scored"] == 2
    assert results.labels_summary("toy-raw")["format"] is not None  # what the writer adds
    assert results.labels("toy-sae") is None and results.labels_summary("toy-sae") is None
    with pytest.raises(UnsafeNameError):
        results.labels("../toy-raw")


def test_results_score_cfg_contrast_on_the_truth(tmp_path) -> None:
    """``cfg_truth`` from the real ``cfg_contrast`` of a two-half capture of the world's 36 prompts: channel 0's
    text adds exactly 1 on the red prompts and nothing elsewhere, and feature_concepts calls it ``colour=red``, so
    the effect is ``1 / sd`` of the red indicator (ddof 1) with the smallest p; channel 1 (noise, called
    ``shape=circle``) pulls the pooled figure towards 0; a variant whose prompts carry no labels gives ``None``."""
    from ddr_core.activation_store import ActivationStore, VariantBatch
    from ddr_core.cfg_contrast import compute_cfg_contrast
    from ddr_core.config import load_project_config
    from ddr_core.feature_concepts import SUMMARY_FILE, TABLE_FILE, feature_concepts_dir, label_parser
    from ddr_core.paths import DataLayout
    from ddr_core.toy_world import parse_prompt, world_prompts

    project = load_project_config()
    layout = DataLayout(tmp_path / "data", "default")
    prompts = list(world_prompts())
    labels = label_parser("toy-world").parse
    prompts_file = layout.prompts_dir("toy-world-prompts") / "prompts.jsonl"
    prompts_file.parent.mkdir(parents=True)
    prompts_file.write_text("".join(json.dumps({"text": p, **labels(p)}) + "\n" for p in prompts))
    rng = np.random.default_rng(0)
    red = np.array([parse_prompt(p)["colour"] == "red" for p in prompts], dtype=np.float32)
    uncond = rng.integers(0, 4, size=(len(prompts), 2, 3)).astype(np.float32)  # exact in float16
    cond = uncond.copy()
    cond[:, :, 0] += red[:, None]
    cond[:, :, 1] += rng.integers(0, 3, size=(len(prompts), 2)).astype(np.float32)
    store = ActivationStore(layout.activations_dir(project.capture_of("toy-raw")))
    rows = [{"generation_id": g, "prompt_index": g, "prompt": p, "image_index": 0, "seed": g,
             "image_path": f"images/{g}.png"} for g, p in enumerate(prompts)]
    store.write_batch(0, rows, [901, 501], {"toy-raw": VariantBatch(cond, uncond)})
    store.finalize()
    compute_cfg_contrast(store, "toy-raw", layout.stage_dir("cfg_contrast", "toy-raw"))
    folder = feature_concepts_dir(layout, "toy-raw")
    folder.mkdir(parents=True)
    pl.DataFrame({"channel": [0, 1, 2], "concept": ["colour=red", "shape=circle", None]}).write_parquet(
        folder / TABLE_FILE)
    (folder / SUMMARY_FILE).write_text("{}")

    results = Results(layout.data_root, "default")
    found = results.cfg_truth("toy-raw", project, permutations=199, bootstraps=100)
    assert found is not None and found["variant"] == "toy-raw" and found["n_prompts"] == 36
    assert found["n_pairs"] == 2 and set(found["families"]) == {"colour", "shape"}
    colour = found["families"]["colour"]
    assert colour["effect"] == pytest.approx(1 / red.std(ddof=1), rel=1e-6)
    assert colour["p_value"] == pytest.approx(1 / 200) and colour["positive_share"] == 1.0
    assert abs(found["families"]["shape"]["effect"]) < colour["effect"]
    assert results.cfg_truth("tiny-raw", project) is None  # tiny prompts: no labels
    with pytest.raises(KeyError, match="unknown variant 'nope'"):
        results.cfg_truth("nope", project)
