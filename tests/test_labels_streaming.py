"""feature_labels in bounded memory (ddr_core.labels.streaming): blocks of features read from the activation store
give the table of the in-memory path, byte for byte; the plan's block does not grow with the width."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from ddr_core.labels import FeatureLabelsConfig
from ddr_core.toy_world import parse_prompt, world_prompts

PROMPTS = list(world_prompts())
IMAGES_PER_PROMPT = 3
TIMESTEPS = [901, 501, 101]
WIDTH = 64  # toy-raw's width in config/ddr.yaml
NO_PEAK = {60, 61, 62, 63}


def _capture(tmp_path: Path):
    """The toy world's 36 prompts x 3 images in 3 batches of a real toy-raw store (3 timesteps, 64 channels), images
    (16 px: colour fill, shape in the top-left block) for all but 6 generations, labelled prompts, statistics' peaks
    for channels 0-59 at varied timesteps and feature_concepts verdicts. Channels fire on a concept value (colour,
    shape or background), sparsely (0 elsewhere), at random, or on ties (values on a 0.25 grid, stored float16)."""
    from ddr_core.activation_store import ActivationStore, VariantBatch
    from ddr_core.config import load_project_config
    from ddr_core.feature_concepts import feature_concepts_dir
    from ddr_core.feature_concepts.labels import label_parser
    from ddr_core.paths import DataLayout
    from tests.test_feature_concepts import _png

    project = load_project_config()
    layout = DataLayout(tmp_path / "data", "default")
    store = ActivationStore(layout.activations_dir(project.capture_of("toy-raw")))
    rng = np.random.default_rng(7)
    concepts = [("colour", v) for v in ("red", "green", "blue")] + [("shape", v) for v in ("circle", "square")] + [
        ("background", v) for v in ("black", "white")]
    n = len(PROMPTS) * IMAGES_PER_PROMPT
    values = np.zeros((n, len(TIMESTEPS), WIDTH), dtype=np.float32)
    rows = []
    for p, prompt in enumerate(PROMPTS):
        parsed = parse_prompt(prompt)
        for i in range(IMAGES_PER_PROMPT):
            g = p * IMAGES_PER_PROMPT + i
            image = None
            if not (p < 6 and i == 2):  # 6 generations without an image
                image = _png(layout.data_root, f"outputs/default/activations/toy/images/gen_{g:07d}.png",
                             parsed["colour"], parsed["shape"])
            rows.append({"generation_id": g, "prompt_index": p, "prompt": prompt, "image_index": i, "seed": g,
                         "image_path": image})
            for c in range(WIDTH):
                family, value = concepts[c % len(concepts)]
                hit = parsed.get(family) == value
                kind = c // len(concepts) % 4
                if kind == 0:
                    values[g, :, c] = 4.0 * hit + rng.random(len(TIMESTEPS))
                elif kind == 1:
                    values[g, :, c] = (3.0 + rng.random(len(TIMESTEPS))) * hit
                elif kind == 2:
                    values[g, :, c] = rng.random(len(TIMESTEPS))
                else:
                    values[g, :, c] = np.round(4 * (2.0 * hit + rng.random(len(TIMESTEPS)))) / 4
    for batch in range(3):
        part = slice(batch * 36, (batch + 1) * 36)
        store.write_batch(batch, rows[part], TIMESTEPS, {"toy-raw": VariantBatch(values[part])})
    store.finalize()
    stats = layout.timestep_stats_dir("toy-raw")
    stats.mkdir(parents=True)
    peaks = [c for c in range(WIDTH) if c not in NO_PEAK]
    pl.DataFrame({"channel": pl.Series(peaks, dtype=pl.Int32), "peak_rank": pl.Series([0] * len(peaks), dtype=pl.Int32),
                  "observed_timestep": pl.Series([TIMESTEPS[c % 3] for c in peaks], dtype=pl.Int64)}).write_parquet(
        stats / "activity_peaks.parquet")
    (stats / "summary.json").write_text('{"width": 64, "config_hash": "stats0"}')
    prompts_file = layout.prompts_dir("toy-world-prompts") / "prompts.jsonl"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    parse = label_parser("toy-world").parse
    prompts_file.write_text("".join(json.dumps({"text": p, **parse(p)}) + "\n" for p in PROMPTS))
    verdicts = feature_concepts_dir(layout, "toy-raw")
    verdicts.mkdir(parents=True)
    pl.DataFrame({"channel": pl.Series(range(WIDTH), dtype=pl.Int32),
                  "concept": ["=".join(concepts[c % len(concepts)]) if c % 2 == 0 else "" for c in range(WIDTH)]}
                 ).write_parquet(verdicts / "feature_concepts.parquet")
    (verdicts / "summary.json").write_text("{}")
    return project, layout, store


def _labeller():
    from ddr_core.labels.toy import ConceptClassifierLabeller
    from tests.test_feature_concepts import RuleClassifier

    return ConceptClassifierLabeller(RuleClassifier(), families=["colour", "shape"], batch_size=16)


def _in_memory(project, layout, store, config: FeatureLabelsConfig) -> pl.DataFrame:
    """The in-memory path (the stage before streaming): every channel's rows at once, every image encoded at once."""
    from ddr_core.feature_concepts import (
        feature_concepts_dir,
        load_images,
        prompt_labels,
        read_feature_concepts,
    )
    from ddr_core.labels import label_features
    from ddr_core.labels.stage import best_prompt_activations

    activations = best_prompt_activations(store, "toy-raw", layout.timestep_stats_dir("toy-raw"))
    generations = store.read_generations()
    wanted = set(activations["generation_id"].to_list())
    kept = generations.filter(pl.col("generation_id").is_in(list(wanted)) & pl.col("image_path").is_not_null())
    labeller = _labeller()
    encoded = labeller.encode(load_images(layout.data_root, kept["image_path"].to_list()))
    row_of = {int(g): i for i, g in enumerate(kept["generation_id"].to_list())}
    dataset = project.prompt_datasets["toy-world-prompts"]
    labels = prompt_labels(layout.prompts_dir("toy-world-prompts") / dataset.file, dataset.labels, dataset.text_field)
    found = read_feature_concepts(feature_concepts_dir(layout, "toy-raw"))
    concepts = {int(c): (v or "") for c, v in found[0].select("channel", "concept").iter_rows()}
    return label_features(activations, encoded, row_of, labeller, range(WIDTH), config, labels=labels,
                          families=list(dataset.labels.families), concepts=concepts)


def _config() -> FeatureLabelsConfig:
    return FeatureLabelsConfig(n_top=8, permutations=200, bootstrap_resamples=200, memory_budget_mib=1024)


def test_streamed_labels_equal_the_in_memory_path_over_several_blocks(tmp_path: Path, monkeypatch) -> None:
    """Known answer: the stage, forced into blocks of 7 features (10 blocks, the last one of 1) read 5 generations at
    a time across 3 batches, with images encoded 32 at a time, writes the table of the in-memory path byte for byte:
    same rows and dtypes, same Parquet bytes. It never reads a whole (generations, timesteps, width) slice: only
    block-wide values (at most 7 channels) come off the store."""
    from ddr_core.activation_store import ActivationStore
    from ddr_core.labels import TABLE_FILE, feature_labels_for_variant, streaming
    from ddr_core.labels import stage as stage_module

    project, layout, store = _capture(tmp_path)
    expected = _in_memory(project, layout, store, _config())
    assert expected["score"].is_not_null().sum() >= 20 and expected["significant"].any()  # labels to compare
    assert expected.filter(pl.col("channel").is_in(list(NO_PEAK)))["label"].is_null().all()

    widths: list[int] = []
    original = ActivationStore.iter_channel_values

    def spy(self, variant, channels, columns, *args, **kwargs):
        for generation_ids, values in original(self, variant, channels, columns, *args, **kwargs):
            widths.append(values.shape[1])
            assert values.shape[0] <= 5
            yield generation_ids, values

    def whole_width(*_args, **_kwargs):
        raise AssertionError("the labels read a whole-width dense slice")

    monkeypatch.setattr(ActivationStore, "iter_channel_values", spy)
    monkeypatch.setattr(ActivationStore, "iter_dense", whole_width)
    monkeypatch.setattr(streaming, "plan_label_blocks",
                        lambda budget, generations, width, prompts: streaming.LabelPlan(budget, 7, 5, -(-width // 7)))
    monkeypatch.setattr(stage_module, "IMAGES_PER_CHUNK", 32)
    said: list[str] = []
    table, summary, out = feature_labels_for_variant(project, layout, "toy-raw", _config(), labeller=_labeller(),
                                                     log=said.append)
    assert "10 block(s) of 7 features over 108 generations" in said[0]
    # per block 3 batches x 8 chunks of <= 5 generations; blocks 0-7 full, block 8 reads 56-59 (60-62 have no
    # peak), block 9 (channel 63, no peak) reads nothing
    assert widths == [7] * 8 * 24 + [4] * 24
    assert_frame_equal(table, expected, check_exact=True)
    reference = tmp_path / "reference.parquet"
    expected.write_parquet(reference)
    assert (out / TABLE_FILE).read_bytes() == reference.read_bytes()
    assert summary["images"] == 102 and not list(out.parent.glob(".*tmp-*"))  # the work folder is gone


def test_one_block_gives_the_same_table(tmp_path: Path) -> None:
    """The default plan (one block: 64 features fit 1024 MiB many times over) gives the same table too."""
    from ddr_core.labels import feature_labels_for_variant

    project, layout, store = _capture(tmp_path)
    table, _, _ = feature_labels_for_variant(project, layout, "toy-raw", _config(), labeller=_labeller())
    assert_frame_equal(table, _in_memory(project, layout, store, _config()), check_exact=True)


def test_channel_values_are_the_dense_values_at_each_channels_column(tmp_path: Path) -> None:
    """iter_channel_values returns what iter_dense has at (generation, column[j], channel[j]), chunk by chunk."""
    _, _, store = _capture(tmp_path)
    dense = np.concatenate([values for _, _, values in store.iter_dense("toy-raw")])
    rng = np.random.default_rng(3)
    channels = np.sort(rng.choice(WIDTH, size=20, replace=False))
    columns = rng.integers(0, len(TIMESTEPS), size=20)
    parts = list(store.iter_channel_values("toy-raw", channels, columns, max_generations=7))
    ids = np.concatenate([g for g, _ in parts])
    got = np.concatenate([v for _, v in parts])
    assert ids.tolist() == list(range(108)) and max(len(g) for g, _ in parts) == 7
    assert np.array_equal(got, dense[:, columns, channels])
    with pytest.raises(ValueError, match="outside 'toy-raw'"):
        next(store.iter_channel_values("toy-raw", [WIDTH], [0]))


def test_the_block_is_set_by_the_budget_and_the_generations_never_by_the_width() -> None:
    """At the thesis' SAE scale (5,000 generations of 1,000 prompts x 20,480 features) the block of features ranked
    at once is the same whatever the width beyond it, about doubles when the budget above the interpreter doubles,
    shrinks with more generations or prompts, and a budget too small for one feature is refused with the budget
    that would do."""
    from ddr_core.labels.streaming import MemoryBudgetError, plan_label_blocks

    full = plan_label_blocks(1024, 5000, 20480, 1000)
    assert 1 < full.block_features < 20480 and full.blocks == -(-20480 // full.block_features)
    assert plan_label_blocks(1024, 5000, 2 * 20480, 1000).block_features == full.block_features
    assert plan_label_blocks(1024, 5000, 10, 1000).block_features == 10  # narrower than a block: one block
    larger = plan_label_blocks(512 + 2 * (1024 - 512), 5000, 20480, 1000)
    assert 1.9 < larger.block_features / full.block_features <= 2.1
    assert plan_label_blocks(1024, 20000, 20480, 1000).block_features < full.block_features
    assert plan_label_blocks(1024, 5000, 20480).block_features < full.block_features  # default: a prompt each
    with pytest.raises(MemoryBudgetError, match="raise memory_budget_mib to at least"):
        plan_label_blocks(1024, 5_000_000, 20480)


def test_the_memory_budget_is_not_part_of_the_config_hash() -> None:
    """Like the statistics' budget: it changes how the labels are computed, never what they are, so folders made
    before it existed keep their hash (the value of FeatureLabelsConfig() at commit 0ff928a)."""
    assert FeatureLabelsConfig(memory_budget_mib=2048).config_hash() == FeatureLabelsConfig().config_hash()
    assert FeatureLabelsConfig().config_hash() == BASE_HASH
    with pytest.raises(ValueError, match="memory_budget_mib"):
        FeatureLabelsConfig(memory_budget_mib=100)


BASE_HASH = "860308451cb2d8d3"


def test_the_memory_benchmark_runs_at_a_tiny_size_and_its_paths_agree(tmp_path: Path) -> None:
    """benchmarks/bench_labels_memory.py end to end at a tiny size: the streamed and in-memory tables are equal and
    the streamed runs stay within the budget (exit 0); keeps the benchmark from rotting."""
    import contextlib
    import io

    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_labels_memory")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = bench.main(["--generations", "40", "--channels", "16", "--timesteps", "2", "--batch", "16",
                           "--scales", "0.5", "1.0", "--in-memory-scales", "1.0", "--workdir", str(tmp_path)])
    assert code == 0, printed.getvalue()
    assert "width 16: streamed table == in-memory table (16 rows)" in printed.getvalue()
