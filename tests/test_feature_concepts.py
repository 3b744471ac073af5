"""Ground-truth concept scores on hand-made statistics, priors and dreams with known answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from ddr_core.config import (
    DEFAULT_CONFIG_PATH,
    LABEL_PARSERS,
    PROJECT_ROOT,
    ConceptLabelsConfig,
    load_project_config,
)
from ddr_core.feature_concepts import (
    LABEL_PARSER_FACTORIES,
    FeatureConceptsConfig,
    check_against_baseline,
    compare_bases,
    compute_feature_concepts,
    dominant_value,
    feature_concepts_for_variant,
    label_parser,
    load_baseline,
    markdown_table,
    prompt_labels,
    read_feature_concepts,
    top_examples,
    write_labelled_prompts,
)
from ddr_core.feature_concepts.cli import main
from ddr_core.paths import DataLayout
from ddr_core.toy_world import COLOUR_RGB, world_prompts
from tests.markdown_check import rendered_text

FAMILIES = ["colour", "shape"]
RECORDED = FeatureConceptsConfig(examples="top_peak")  # the hand-made dataset examples (no activation store)
SHAPE_GRAY = {"circle": 0, "square": 128, "triangle": 255}
PROMPTS = {  # generation id -> prompt
    0: "a red circle on a black background", 1: "a red circle on a white background",
    2: "a red circle on a gray background", 3: "a red square on a black background",
    4: "a blue square on a black background", 5: "a blue square on a white background",
    6: "a green triangle on a black background", 7: "a purple cloud",  # 7: not a world prompt, no labels
}


# --- hand-made inputs --------------------------------------------------------------------------------


def _example_rows() -> list[tuple[int, int, int, float]]:
    """(channel, timestep, generation_id, activation); ranks follow the activation order per (channel, t)."""
    return [
        # channel 0: top peak at 501 -> three red circles; at 901 a blue square and a red circle
        (0, 501, 0, 9.0), (0, 501, 1, 8.0), (0, 501, 2, 7.0),
        (0, 901, 4, 5.0), (0, 901, 0, 4.0),
        # channel 1: top peak at 901 -> red circle, red square, blue square, blue square, + an unlabelled one
        (1, 901, 1, 6.0), (1, 901, 3, 5.0), (1, 901, 4, 4.0), (1, 901, 5, 3.0), (1, 901, 7, 2.0),
        # channel 2: only two examples at its peak
        (2, 101, 6, 1.0), (2, 101, 3, 0.5),
        # channel 3: inactive, no examples and no peak
    ]


def write_stats(stats_dir: Path, width: int = 4) -> Path:
    stats_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(_example_rows(), key=lambda r: (r[0], -r[1], -r[3]))
    ranks, last = [], None
    for channel, timestep, _, _ in rows:
        ranks.append(0 if (channel, timestep) != last else ranks[-1] + 1)
        last = (channel, timestep)
    pl.DataFrame({
        "channel": pl.Series([r[0] for r in rows], dtype=pl.Int32),
        "timestep": pl.Series([r[1] for r in rows], dtype=pl.Int32),
        "rank": pl.Series(ranks, dtype=pl.Int32),
        "generation_id": pl.Series([r[2] for r in rows], dtype=pl.Int64),
        "activation": pl.Series([r[3] for r in rows], dtype=pl.Float32),
        "prompt": [PROMPTS[r[2]] for r in rows],
        "image_path": [f"outputs/default/activations/toy/images/gen_{r[2]:07d}.png" for r in rows],
    }).write_parquet(stats_dir / "dataset_examples.parquet")
    peaks = [(0, 0, 505, 501), (0, 1, 905, 901), (1, 0, 899, 901), (2, 0, 100, 101)]
    pl.DataFrame({
        "channel": pl.Series([p[0] for p in peaks], dtype=pl.Int32),
        "peak_rank": pl.Series([p[1] for p in peaks], dtype=pl.Int32),
        "timestep": pl.Series([p[2] for p in peaks], dtype=pl.Int32),
        "height": [0.5] * len(peaks), "plateau_start": pl.Series([p[2] for p in peaks], dtype=pl.Int32),
        "plateau_end": pl.Series([p[2] for p in peaks], dtype=pl.Int32),
        "observed_timestep": pl.Series([p[3] for p in peaks], dtype=pl.Int64),
    }).write_parquet(stats_dir / "activity_peaks.parquet")
    (stats_dir / "summary.json").write_text(json.dumps({"width": width, "config_hash": "stats0"}))
    return stats_dir


def write_prompts(path: Path) -> Path:
    """A labelled JSONL of generation prompts 0-6 (7 is left out: no labels)."""
    labels = label_parser("toy-world").parse
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": p, **labels(p)}) for g, p in PROMPTS.items() if g != 7]
    path.write_text("\n".join(lines) + "\n")
    return path


def _png(data_root: Path, relative: str, colour: str, shape: str, size: int = 16) -> str:
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[...] = COLOUR_RGB[colour]
    array[:4, :4] = SHAPE_GRAY[shape]  # the shape is written into the top-left block
    (data_root / relative).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(data_root / relative)
    return relative


def write_priors_and_dreams(data_root: Path, priors_dir: Path, dreams_dir: Path) -> None:
    def prior(channel: int, status: str, images: list[tuple[str, str]]) -> None:
        folder = priors_dir / f"channel_{channel:05d}"
        paths = [_png(data_root, f"{folder.relative_to(data_root)}/seed_{i}.png", c, s) for i, (c, s) in enumerate(images)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prior.json").write_text(json.dumps({"channel": channel, "status": status, "images": paths}))

    prior(0, "done", [("red", "circle"), ("red", "circle"), ("blue", "circle")])
    prior(1, "skipped", [])
    prior(2, "done", [("green", "square")])
    folder = dreams_dir / "channel_00000"
    results, quality = {}, []
    for timestep in (501, 0):
        results[str(timestep)] = {"seeds": [1, 2], "images": [
            _png(data_root, f"{folder.relative_to(data_root)}/t_{timestep:04d}/seed_{s}.png", "red", "square")
            for s in (1, 2)]}
        quality += [{"channel": 0, "timestep": timestep, "seed": s, "prior_activation": 1.0 + s / 10,
                     "dream_activation": 5.0, "failed": False} for s in (1, 2)]  # every dream raised
    (folder / "dream.json").write_text(json.dumps({"channel": 0, "results": results}))
    pl.DataFrame(quality).write_parquet(dreams_dir / "quality.parquet")


class RuleClassifier(nn.Module):
    """A concept classifier with a fixed rule: colour = nominal colour nearest the image's bottom-right
    quarter, shape = the grey level of the top-left 4x4 block (0 circle, 128 square, 255 triangle)."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        from ddr_core.concept_classifier import ConceptClassifierConfig

        self.config = ConceptClassifierConfig(image_size=image_size)
        self.register_buffer("colours", torch.tensor([COLOUR_RGB[c] for c in self.config.heads["colour"]],
                                                     dtype=torch.float32) / 127.5 - 1)
        self.register_buffer("greys", torch.tensor([SHAPE_GRAY[s] for s in self.config.heads["shape"]],
                                                   dtype=torch.float32) / 127.5 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        half = images.shape[-1] // 2
        colour = images[:, :, half:, half:].mean(dim=(2, 3))  # (batch, 3)
        grey = images[:, :, :4, :4].mean(dim=(1, 2, 3))  # (batch,)
        return {"colour": -torch.cdist(colour, self.colours), "shape": -(grey[:, None] - self.greys).abs(),
                "background": torch.zeros(images.shape[0], 3)}


@pytest.fixture()
def scene(tmp_path: Path):
    data_root = tmp_path / "data"
    stats_dir = write_stats(data_root / "stats")
    labels = prompt_labels(write_prompts(tmp_path / "prompts.jsonl"), ConceptLabelsConfig(families=FAMILIES))
    write_priors_and_dreams(data_root, data_root / "priors", data_root / "dreams")
    return data_root, stats_dir, labels


# --- tests ---------------------------------------------------------------------------------------------


def test_labels_from_jsonl_fields_and_from_the_parser(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "p.jsonl")
    fields = prompt_labels(path, ConceptLabelsConfig(families=FAMILIES))
    assert fields.columns == ["prompt", "colour", "shape"] and fields.height == 7
    assert fields.filter(pl.col("prompt") == PROMPTS[4]).row(0) == (PROMPTS[4], "blue", "square")
    parsed = prompt_labels(path, ConceptLabelsConfig(families=["shape", "background"], parser="toy-world"),
                           prompts=list(PROMPTS.values()))
    assert parsed.height == 8
    assert parsed.filter(pl.col("prompt") == PROMPTS[6]).row(0) == (PROMPTS[6], "triangle", "black")
    assert parsed.filter(pl.col("prompt") == PROMPTS[7]).row(0) == (PROMPTS[7], None, None)  # rejected: no labels
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "colour": 3}) + "\n")
    with pytest.raises(ValueError, match="label field 'colour' is int"):
        prompt_labels(bad, ConceptLabelsConfig(families=["colour"]))
    bad.write_text(json.dumps({"text": "x", "colour": "red"}) + "\n" + json.dumps({"text": "x ", "colour": "blue"}))
    with pytest.raises(ValueError, match="two label sets"):
        prompt_labels(bad, ConceptLabelsConfig(families=["colour"]))
    with pytest.raises(ValueError, match="gives the families"):
        ConceptLabelsConfig(families=["size"], parser="toy-world")


def test_labels_skip_the_lines_load_prompts_counts_invalid_and_name_the_line_of_a_bad_label(tmp_path: Path) -> None:
    """The label reader reads line by line as load_prompts does: a deeply nested, repeated-key, overlong or
    unusable-text line gives no labels (it raised RecursionError / held the whole file before); a label
    holding a lone surrogate or a control character is refused naming its line."""
    from ddr_core.prompts import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        json.dumps({"text": "a red circle", "colour": "red"}),
        "[" * 100_000 + "]" * 100_000,
        '{"text": "a blue circle", "text": "a red square", "colour": "blue"}',
        json.dumps({"text": "x" * (1 << 20), "colour": "green"}),  # over the 1 MiB line bound
        '{"text": "a \\ud800 circle", "colour": "red"}',
        json.dumps({"text": "a blue square", "colour": "blue"}),
    ]) + "\n", encoding="utf-8")
    labels = prompt_labels(path, ConceptLabelsConfig(families=["colour"]))
    assert labels.rows() == [("a red circle", "red"), ("a blue square", "blue")]
    assert labels["prompt"].to_list() == load_prompts(path).texts
    for label, problem in (("\\ud800", "lone surrogate U+D800"), ("re\\u0000d", "control character U+0000")):
        path.write_text(json.dumps({"text": "a cat", "colour": "red"}) + "\n"
                        + '{"text": "a dog", "colour": "' + label + '"}\n', encoding="utf-8")
        with pytest.raises(ValueError, match=rf"p\.jsonl line 2: label field 'colour': {re.escape(problem)}"):
            prompt_labels(path, ConceptLabelsConfig(families=["colour"]))


def test_label_parsers_match_the_config_schema() -> None:
    assert set(LABEL_PARSERS) == set(LABEL_PARSER_FACTORIES)
    for name, families in LABEL_PARSERS.items():
        assert label_parser(name).families == families


def test_committed_toy_world_prompts_are_generated_from_the_world(tmp_path: Path) -> None:
    committed = PROJECT_ROOT / "datasets" / "toy-world" / "prompts.jsonl"
    fresh = write_labelled_prompts(tmp_path / "prompts.jsonl", world_prompts(), "toy-world")
    assert committed.read_bytes() == fresh.read_bytes()
    assert main(["write-prompts", "--out", str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == fresh.read_bytes()
    config = load_project_config()
    dataset = config.prompt_datasets["toy-world-prompts"]
    assert Path(dataset.source.local) == committed and dataset.labels.families == [*FAMILIES, "background"]
    labels = prompt_labels(committed, dataset.labels)
    assert labels.height == 36 and labels.null_count().sum_horizontal().item() == 0


def test_top_examples_at_the_top_peak_or_pooled(scene) -> None:
    _, stats_dir, _ = scene
    peak = top_examples(stats_dir, RECORDED)
    assert peak.filter(pl.col("channel") == 0)["generation_id"].to_list() == [0, 1, 2]
    assert set(peak.filter(pl.col("channel") == 0)["timestep"].to_list()) == {501}
    assert peak.filter(pl.col("channel") == 1)["generation_id"].to_list() == [1, 3, 4, 5, 7]
    assert 3 not in peak["channel"].to_list()
    two = top_examples(stats_dir, FeatureConceptsConfig(examples="top_peak", n_examples=2))
    assert two.filter(pl.col("channel") == 1)["generation_id"].to_list() == [1, 3]
    pooled = top_examples(stats_dir, FeatureConceptsConfig(examples="all_timesteps"))
    # generation 0 is an example at two timesteps: first; then by the largest activation
    assert pooled.filter(pl.col("channel") == 0)["generation_id"].to_list() == [0, 1, 2, 4]
    assert pooled.filter(pl.col("channel") == 0)["rank"].to_list() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="reads the capture's activation store"):
        top_examples(stats_dir, FeatureConceptsConfig())


def test_top_examples_rank_every_generation_at_the_peak_one_per_prompt(tmp_path: Path) -> None:
    """Six generations of three prompts (two images each) in a real activation store; each channel's top
    prompts are ranked by their best image's activation at the channel's top peak, each prompt once."""
    from ddr_core.activation_store import ActivationStore, VariantBatch

    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[4], PROMPTS[4], PROMPTS[6], PROMPTS[6]]
    store = ActivationStore(tmp_path / "capture")
    rows = [{"generation_id": g, "prompt_index": g // 2, "prompt": p, "image_index": g % 2, "seed": g,
             "image_path": f"images/{g}.png"} for g, p in enumerate(prompts)]
    values = np.zeros((6, 3, 2), dtype=np.float32)  # (generation, timestep 901/501/101, channel)
    values[:, 1, 0] = [1, 9, 5, 2, 7, 8]  # channel 0 at 501: prompt 0 best 9, prompt 6 best 8, prompt 4 best 5
    values[:, 0, 0] = [99, 0, 0, 0, 0, 0]  # not channel 0's peak: ignored
    values[:, 2, 1] = [3, 3, 6, 1, 2, 0]  # channel 1 at 101: prompt 4 (6), then prompts 0 (3) and 6 (2)
    store.write_batch(0, rows, [901, 501, 101], {"toy-raw": VariantBatch(values)})
    store.finalize()
    stats = tmp_path / "stats"
    stats.mkdir()
    pl.DataFrame({"channel": pl.Series([0, 1], dtype=pl.Int32), "peak_rank": pl.Series([0, 0], dtype=pl.Int32),
                  "observed_timestep": pl.Series([501, 101], dtype=pl.Int64)}).write_parquet(
        stats / "activity_peaks.parquet")
    examples = top_examples(stats, FeatureConceptsConfig(n_examples=2), store=store, variant="toy-raw")
    zero = examples.filter(pl.col("channel") == 0)
    assert zero["prompt"].to_list() == [PROMPTS[0], PROMPTS[6]] and zero["generation_id"].to_list() == [1, 5]
    assert zero["activation"].to_list() == [9.0, 8.0] and set(zero["timestep"]) == {501}
    one = top_examples(stats, FeatureConceptsConfig(), store=store, variant="toy-raw").filter(pl.col("channel") == 1)
    assert one["prompt"].to_list() == [PROMPTS[4], PROMPTS[0], PROMPTS[6]] and one["rank"].to_list() == [0, 1, 2]
    assert one["generation_id"].to_list() == [2, 0, 4]  # ties (3, 3): the lower generation id


def test_dominant_value() -> None:
    assert dominant_value(["red", "blue", "blue", "red"]) == ("blue", 0.5)  # tie: alphabetical
    assert dominant_value([]) == (None, None)


def test_dreams_not_raised_above_their_start_s_noise_are_not_scored(scene) -> None:
    """Two of the four dreams did not raise their channel (gain 0.01 vs a start noise of 0.07): only the other
    two count in ``n_dream_images`` and the agreement; the predictions file keeps all four (the benchmark's
    "no-ops included" row)."""
    data_root, stats_dir, labels = scene
    path = data_root / "dreams" / "quality.parquet"
    quality = pl.read_parquet(path).with_columns(
        pl.when(pl.col("timestep") == 0).then(pl.col("prior_activation") + 0.01).otherwise(pl.col("dream_activation"))
        .alias("dream_activation"))
    quality.write_parquet(path)
    result = compute_feature_concepts(
        stats_dir, labels, FAMILIES, data_root / "out", variant="toy-raw", basis="raw", data_root=data_root,
        priors_dir=data_root / "priors", dreams_dir=data_root / "dreams", classifier=RuleClassifier(),
        config=FeatureConceptsConfig(examples="top_peak", alpha=0.25, permutations=200))
    zero = result.table.row(0, named=True)
    assert zero["n_dream_images"] == 2 and zero["dream_agreement_colour"] == 1.0
    assert pl.read_parquet(data_root / "out" / "dream_predictions.parquet").height == 4
    (data_root / "dreams" / "quality.parquet").unlink()  # no quality measured: no dream is scored
    result = compute_feature_concepts(
        stats_dir, labels, FAMILIES, data_root / "out2", variant="toy-raw", basis="raw", data_root=data_root,
        priors_dir=data_root / "priors", dreams_dir=data_root / "dreams", classifier=RuleClassifier(),
        config=FeatureConceptsConfig(examples="top_peak", alpha=0.25, permutations=200))
    assert not result.table.row(0, named=True)["n_dream_images"]


def test_purity_agreement_and_summary_have_the_known_values(scene) -> None:
    """The exact prompt-level nulls by hand. The pool: 7 labelled prompts, colours red 4 / blue 2 / green 1,
    shapes circle 3 / square 3 / triangle 1.
    Channel 0 (3 red circles): colour p = C(4,3)/C(7,3) = 4/35; shape p = (3 circles or 3 squares) 2/35; its
    colour chance purity = E[max]/3 with E[max] = (4x3 + 18x2 + 4x2 + 8x1 + 1x2)/35 = 66/35.
    Channel 1 (red, red, blue, blue / 3 squares + a circle): colour p = 1 (4 prompts of 3 colours always
    repeat one), shape p = (4 + 4)/C(7,4) = 8/35.
    BH over the four (p x 4 / rank, then the running minimum from the top): 2/35 -> 8/35, 4/35 -> 8/35,
    8/35 -> 32/105, 1 -> 1."""
    data_root, stats_dir, labels = scene
    pool = pl.DataFrame({"prompt": [PROMPTS[g] for g in range(8)]})
    config = FeatureConceptsConfig(examples="top_peak", alpha=0.25, permutations=2000)
    result = compute_feature_concepts(
        stats_dir, labels, FAMILIES, data_root / "out", variant="toy-raw", basis="raw", data_root=data_root,
        priors_dir=data_root / "priors", dreams_dir=data_root / "dreams", classifier=RuleClassifier(),
        generation_pool=pool, config=config)
    rows = {row["channel"]: row for row in result.table.iter_rows(named=True)}
    assert result.table["channel"].to_list() == [0, 1, 2, 3] and set(result.table["basis"]) == {"raw"}
    zero, one, two, three = rows[0], rows[1], rows[2], rows[3]
    assert (zero["dominant_colour"], zero["purity_colour"], zero["dominant_shape"], zero["purity_shape"]) == \
        ("red", 1.0, "circle", 1.0)
    assert zero["purity"] == 1.0 and zero["purity_joint"] == 1.0 and zero["examples_timestep"] == 501
    assert one["n_examples"] == 5 and one["n_labelled"] == 4  # the unlabelled prompt is left out
    assert (one["dominant_colour"], one["purity_colour"]) == ("blue", 0.5)  # 2 red, 2 blue: alphabetical
    assert (one["dominant_shape"], one["purity_shape"]) == ("square", 0.75)
    assert one["purity"] == pytest.approx(0.625) and one["purity_joint"] == 0.5
    assert two["n_labelled"] == 2 and two["purity"] is None and two["dominant_colour"] is None  # < min_examples
    assert three["n_examples"] == 0 and three["purity"] is None
    assert zero["p_colour"] == pytest.approx(4 / 35) and zero["p_shape"] == pytest.approx(2 / 35)
    assert zero["chance_purity_colour"] == pytest.approx(66 / 35 / 3)
    assert one["p_colour"] == 1.0 and one["p_shape"] == pytest.approx(8 / 35)
    assert zero["q_shape"] == pytest.approx(8 / 35) and zero["q_colour"] == pytest.approx(8 / 35)
    assert one["q_shape"] == pytest.approx(32 / 105) and one["q_colour"] == 1.0 and two["q_colour"] is None
    assert zero["concept"] == "colour=red, shape=circle" and zero["n_concepts"] == 2
    assert one["concept"] == "" and one["n_concepts"] == 0  # not selective at q < 0.25
    assert zero["purity_excess"] == pytest.approx(zero["purity"] - zero["chance_purity"]) and two["purity_excess"] is None
    # priors: red circle, red circle, blue circle; dreams: four red squares (two timesteps)
    assert zero["n_prior_images"] == 3 and zero["prior_agreement_colour"] == pytest.approx(2 / 3)
    assert zero["prior_agreement_shape"] == 1.0 and zero["prior_vote_colour"] == "red"
    assert zero["n_dream_images"] == 4 and zero["dream_agreement_colour"] == 1.0
    assert zero["dream_agreement_shape"] == 0.0 and zero["dream_vote_shape"] == "square"
    assert zero["dream_agreement"] == 0.5
    assert one["n_prior_images"] == 0 and one["prior_agreement_colour"] is None  # skipped prior
    assert two["n_prior_images"] == 1 and two["prior_agreement_colour"] is None  # no dominant value
    # channel 0 is selective in both families: its selective agreement is the plain mean
    assert zero["prior_agreement_selective"] == pytest.approx(5 / 6) and two["prior_agreement_selective"] is None
    summary = result.summary
    assert summary["counts"] == {"channels": 4, "with_examples": 3, "with_purity": 2, "without_enough_examples": 1,
                                 "with_prior_images": 2, "with_dream_images": 1}
    assert summary["purity"]["overall"]["mean"] == pytest.approx(0.8125)
    assert summary["purity"]["overall"]["interval"] == [pytest.approx(0.625), pytest.approx(1.0)]
    assert summary["purity"]["families"]["shape"]["mean"] == pytest.approx(0.875)
    significance = summary["significance"]
    assert significance["selective_channels"] == 1 and significance["channels_scored"] == 2
    assert significance["tests"] == 4 and significance["share"] == 0.5
    assert significance["families"]["colour"] == {"channels": 1, "values": {"red": 1}, "min_p": pytest.approx(4 / 35)}
    assert significance["families"]["shape"]["min_p"] == pytest.approx(2 / 35)
    prior = summary["agreement"]["prior"]
    colour = prior["families"]["colour"]
    # one unit (channel 0: 2 of its 3 priors red); every prior image (4: channel 2's green square too) is the
    # per-image chance's reference: 2 red of 4; one unit cannot be permuted: p = 1
    assert colour["rate"] == pytest.approx(2 / 3) and colour["test"]["chance"] == pytest.approx(0.5)
    assert colour["test"]["p_value"] == 1.0 and colour["test"]["n_units"] == 1 and colour["chance"] == 0.5
    assert colour["significant"]["rate"] == pytest.approx(2 / 3)
    assert prior["n_channels"] == 1 and prior["images"] == 3
    selective = prior["selective"]  # channel 0's colour (2/3) and shape (3/3) pairs
    assert selective["rate"] == pytest.approx(5 / 6) and selective["n_units"] == 2
    assert summary["figures"]["prior_agreement_selective"] == pytest.approx(5 / 6, abs=1e-6)
    assert summary["figures"]["selective_share"] == 0.5
    assert summary["dominant_counts"]["colour"] == {"blue": 1, "red": 1}
    figures = summary["figures"]
    assert figures["purity_mean"] == 0.8125 and figures["dream_agreement_shape"] == 0.0
    assert summary["unlabelled_examples"] == 1 and summary["sources"] == ["prior", "dream"]
    table, saved = read_feature_concepts(data_root / "out")
    assert saved == json.loads(json.dumps(summary)) and table.equals(result.table)
    predictions = pl.read_parquet(data_root / "out" / "prior_predictions.parquet")
    assert predictions.filter(pl.col("channel") == 0)["colour"].to_list() == ["red", "red", "blue"]
    strict = compute_feature_concepts(stats_dir, labels, FAMILIES, data_root / "strict", variant="toy-raw",
                                      basis="raw", generation_pool=pool, config=FeatureConceptsConfig(examples="top_peak"))
    assert strict.summary["significance"]["selective_channels"] == 0  # at q < 0.05 nothing: 3 prompts are too few
    assert strict.table["concept"].to_list() == ["", "", "", ""]


def test_selective_agreement_scores_only_the_channels_own_concepts() -> None:
    from ddr_core.feature_concepts import channel_agreement

    purity = pl.DataFrame({"channel": [0, 1, 2], "dominant_colour": ["red", "blue", "green"],
                           "q_colour": [0.001, 0.5, 0.01], "dominant_shape": ["circle", "square", "circle"],
                           "q_shape": [0.6, 0.002, 0.03]}, schema_overrides={"channel": pl.Int32})
    predicted = pl.DataFrame({
        "channel": [0, 0, 1, 1, 2, 2], "image": list("abcdef"),
        "colour": ["red", "red", "red", "red", "green", "blue"],
        "shape": ["square", "square", "square", "circle", "circle", "circle"]}, schema_overrides={"channel": pl.Int32})
    rows = {r["channel"]: r for r in channel_agreement(purity, predicted, FAMILIES, "prior", 0.05).iter_rows(named=True)}
    # channel 0 is a red channel (any shape): it drew red squares, right in colour, "wrong" in shape
    assert rows[0]["prior_agreement"] == 0.5 and rows[0]["prior_agreement_selective"] == 1.0
    # channel 1 is a square channel: half its images are squares; its colour (blue, q 0.5) is not its concept
    assert rows[1]["prior_agreement_selective"] == 0.5 and rows[1]["prior_agreement_colour"] == 0.0
    # channel 2 is selective in both: mean of colour 0.5 and shape 1.0
    assert rows[2]["prior_agreement_selective"] == 0.75
    strict = channel_agreement(purity, predicted, FAMILIES, "prior", 0.005)
    assert strict["prior_agreement_selective"].to_list() == [1.0, 0.5, None]


def test_recognisability_is_the_distance_to_the_nearest_render_of_the_world(scene) -> None:
    data_root, stats_dir, labels = scene
    # the "world" is the red-circle picture of the priors (and a blank one): red circles are recognisable,
    # the blue circle and the green square are not; the dreams' red squares differ from a red circle only in
    # the 4x4 shape block of 16x16 (grey 128 vs 0): an RMSE of sqrt(16 / 256) x 128 / 255 = 0.125 < 0.15
    red_circle = np.asarray(Image.open(data_root / "priors" / "channel_00000" / "seed_0.png").convert("RGB"))
    asked: list[int] = []

    def renders(side: int) -> np.ndarray:
        asked.append(side)
        return np.stack([red_circle, np.zeros_like(red_circle)])

    generations = [red_circle, red_circle, np.full_like(red_circle, 90)]
    result = compute_feature_concepts(
        stats_dir, labels, FAMILIES, data_root / "out", variant="toy-raw", basis="raw", data_root=data_root,
        priors_dir=data_root / "priors", dreams_dir=data_root / "dreams", classifier=RuleClassifier(),
        config=RECORDED, world_renders=renders, generation_images=generations)
    rows = {row["channel"]: row for row in result.table.iter_rows(named=True)}
    assert set(asked) == {16}
    # channel 0's priors: two red circles (exactly a render: RMSE 0) and a blue circle (not): the median is 0
    assert rows[0]["prior_recognisable"] == pytest.approx(2 / 3) and rows[0]["prior_world_rmse"] == 0.0
    channel_0 = pl.read_parquet(data_root / "out" / "prior_predictions.parquet").filter(pl.col("channel") == 0)
    assert sorted(channel_0["world_rmse"].to_list())[:2] == [0.0, 0.0] and channel_0["world_rmse"].max() > 0.15
    assert rows[2]["prior_recognisable"] == 0.0 and rows[1]["prior_recognisable"] is None  # skipped: no images
    assert rows[0]["dream_recognisable"] == 1.0 and rows[0]["dream_world_rmse"] == pytest.approx(0.25 * 128 / 255)
    world = result.summary["world"]
    assert world["sources"]["prior"] == {"images": 4, "recognisable": 0.5, "rmse_median": pytest.approx(
        float(np.median(pl.read_parquet(data_root / "out" / "prior_predictions.parquet")["world_rmse"])))}
    assert world["generations"]["recognisable"] == pytest.approx(2 / 3) and world["recognisable_rmse"] == 0.15
    assert result.summary["figures"]["prior_recognisable"] == 0.5
    assert result.summary["figures"]["dream_recognisable"] == 1.0
    # make demo ends with one line per variant from this summary
    from dagster_project.demo import ground_truth_lines

    layout = DataLayout(data_root, "default")
    layout.stage_dir("feature_concepts", "toy-raw").parent.mkdir(parents=True, exist_ok=True)
    (data_root / "out").rename(layout.stage_dir("feature_concepts", "toy-raw"))
    lines = ground_truth_lines(layout, ["toy-raw", "toy-sae"])
    assert lines[0].startswith("Ground truth (feature_concepts") and len(lines) == 5
    assert lines[1].startswith("  ground truth toy-raw: 0 of 2 channels selective (BH q < 0.05) [0.00, 0.00]; "
                               "purity 0.81 [0.62, 1.00] vs chance ")
    assert lines[2].startswith("    priors: 0.50 recognisable; show the selective concept - of 0 channel x family")
    assert "all channels: colour 0.67 (chance 0.50, p 1.00); shape 1.00" in lines[2]
    assert lines[3].startswith("    dreams: 1.00 recognisable;") and lines[4] == "    generations 0.67 recognisable"
    plain = compute_feature_concepts(stats_dir, labels, FAMILIES, data_root / "plain", variant="toy-raw", basis="raw",
                                     data_root=data_root, priors_dir=data_root / "priors", classifier=RuleClassifier(),
                                     config=FeatureConceptsConfig(examples="top_peak", dreams=False))
    assert "prior_recognisable" not in plain.table.columns and "world" not in plain.summary


def test_nearest_render_rmse() -> None:
    from ddr_core.toy_world import RECOGNISABLE_RMSE, nearest_render_rmse, reference_renders

    renders = reference_renders(count=72)
    assert renders.shape == (72, 32, 32, 3) and renders.dtype == np.uint8
    assert np.array_equal(renders, reference_renders(count=72))  # deterministic
    exact = nearest_render_rmse(renders[:5], renders)
    assert (exact == 0.0).all()  # exactly, whatever the BLAS kernel
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    assert (nearest_render_rmse(noise, renders) > 1.5 * RECOGNISABLE_RMSE).all()  # ~0.29 even to a gray field
    shifted = np.clip(renders[:1].astype(int) + 10, 0, 255).astype(np.uint8)
    assert nearest_render_rmse(shifted, renders)[0] == pytest.approx(10 / 255, abs=0.01)
    with pytest.raises(ValueError, match="one size"):
        nearest_render_rmse(noise[:, :16, :16], renders)


def test_without_a_classifier_only_purity_is_scored(scene) -> None:
    data_root, stats_dir, labels = scene
    result = compute_feature_concepts(stats_dir, labels, FAMILIES, data_root / "out2", variant="toy-sae",
                                      basis="sae", config=FeatureConceptsConfig(examples="all_timesteps"))
    assert "prior_agreement" not in result.table.columns and result.summary["agreement"] == {}
    # pooled examples of channel 0: three red circles and a blue square
    row = result.table.row(0, named=True)
    assert (row["dominant_colour"], row["purity_colour"]) == ("red", 0.75)
    assert set(result.summary["figures"]) == {"purity_mean", "purity_median", "purity_joint_mean", "selective_share",
                                              "purity_excess_mean", "purity_colour_mean", "purity_shape_mean"}
    with pytest.raises(ValueError, match="no column for"):
        compute_feature_concepts(stats_dir, labels, ["size"], data_root / "out3", variant="v", basis="raw")


def test_baseline_check_names_the_regressed_figure(tmp_path: Path) -> None:
    figures = {"purity_mean": 0.70, "prior_agreement_colour": 0.40}
    baseline = {"tolerance": 0.05, "tolerances": {"prior_agreement_colour": 0.2},
                "variants": {"toy-raw": {"purity_mean": 0.80, "prior_agreement_colour": 0.55,
                                         "dream_agreement_colour": 0.5}}}
    result = check_against_baseline(figures, baseline, "toy-raw")
    assert not result["passed"]
    assert [r["figure"] for r in result["regressions"]] == ["dream_agreement_colour", "purity_mean"]
    assert "purity_mean 0.7000 < baseline 0.8000 - 0.05" in result["description"]
    assert "dream_agreement_colour missing" in result["description"]
    assert result["compared"]["prior_agreement_colour"]["delta"] == pytest.approx(-0.15)  # within its 0.2
    loose = check_against_baseline({**figures, "dream_agreement_colour": 0.6}, baseline, "toy-raw", tolerance=0.2)
    assert loose["passed"] and "3 figure(s) within tolerance" in loose["description"]
    none = check_against_baseline(figures, baseline, "toy-sae")
    assert none["passed"] and not none["has_baseline"]
    committed = load_baseline()
    assert isinstance(committed["variants"], dict) and committed["tolerance"] > 0
    with pytest.raises(FileNotFoundError, match="write one with"):
        load_baseline(tmp_path / "none.json")


def test_baseline_cli_and_comparison_table(scene, tmp_path: Path) -> None:
    data_root, stats_dir, labels = scene
    raw = compute_feature_concepts(stats_dir, labels, FAMILIES, data_root / "raw", variant="toy-raw", basis="raw",
                                   config=RECORDED)
    sae = compute_feature_concepts(stats_dir, labels, FAMILIES, data_root / "sae", variant="toy-sae", basis="sae",
                                   config=FeatureConceptsConfig(examples="all_timesteps"))
    out = tmp_path / "baseline.json"
    assert main(["baseline", "--summary", str(data_root / "raw" / "summary.json"),
                 str(data_root / "sae" / "summary.json"), "--out", str(out), "--tolerance", "0.1"]) == 0
    written = json.loads(out.read_text())
    assert written["tolerance"] == 0.1 and set(written["variants"]) == {"toy-raw", "toy-sae"}
    assert written["variants"]["toy-raw"]["purity_mean"] == 0.8125
    assert check_against_baseline(raw.summary["figures"], written, "toy-raw")["passed"]
    rows = compare_bases({"toy-raw": raw.summary, "toy-sae": sae.summary})
    assert [r["basis"] for r in rows] == ["raw", "sae"] and rows[0]["purity_mean"] == pytest.approx(0.8125)
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| variant | basis | scored") and "0.812" in table


def test_stage_reads_the_project_config(tmp_path: Path) -> None:
    """feature_concepts_for_variant: labels from the provisioned prompts, the model's saved classifier."""
    from ddr_core.concept_classifier import (
        ConceptClassifier,
        ConceptClassifierConfig,
        predict_concepts,
        save_concept_classifier,
    )

    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config_path = tmp_path / "ddr.yaml"
    config_path.write_text(yaml.safe_dump(data))
    project = load_project_config(config_path)
    layout = DataLayout(tmp_path / "data", "default")
    write_stats(layout.timestep_stats_dir("toy-raw"))
    write_prompts(layout.prompts_dir("toy-world-prompts") / "prompts.jsonl")
    torch.manual_seed(0)
    classifier = ConceptClassifier(ConceptClassifierConfig(image_size=16, channels=(8,), norm_groups=4))
    save_concept_classifier(classifier, layout.model_dir("toy-world") / "concept_classifier")
    write_priors_and_dreams(layout.data_root, layout.stage_dir("priors", "toy-raw"), layout.stage_dir("dreams", "toy-raw"))
    result = feature_concepts_for_variant(project, layout, "toy-raw", RECORDED)
    assert result.out_dir == layout.stage_dir("feature_concepts", "toy-raw")
    assert result.summary["counts"]["with_purity"] == 2 and result.summary["classifier"]
    image = np.asarray(Image.open(layout.stage_dir("priors", "toy-raw") / "channel_00000" / "seed_2.png"))
    expected = classifier.config.heads["colour"][int(predict_concepts(classifier, image[None])["colour"][0])]
    predictions = pl.read_parquet(result.out_dir / "prior_predictions.parquet")
    assert predictions.filter(pl.col("channel") == 0)["colour"].to_list()[2] == expected
    assert sorted(project.labelled_variants()) == ["toy-noyellow-raw", "toy-raw", "toy-rich-raw", "toy-rich-sae",
                                                   "toy-sae", "toy-seed1-raw"]  # docs/TOY_WORLD.md, docs/MATCHING.md
    # the toy-world model declares its world: priors / dreams are measured against its renders (at 16 px here)
    assert project.models["toy-world"].world == "toy-world"
    assert result.summary["world"]["sources"]["prior"]["images"] == 4
    assert result.table["prior_recognisable"].drop_nulls().len() == 2
    with pytest.raises(ValueError, match="declares no concept labels"):
        feature_concepts_for_variant(project, layout, "tiny-raw")
    with pytest.raises(FileNotFoundError, match=r"materialize timestep_stats\[toy-sae\]"):
        feature_concepts_for_variant(project, layout, "toy-sae")


# --- the Dagster asset ----------------------------------------------------------------------------------


def test_asset_partitions_mappings_and_materialization(tmp_path: Path) -> None:
    import dagster as dg

    from ddr_assets import ALL_ASSETS
    from ddr_assets.feature_concepts import CHECK_NAME, feature_concepts
    from ddr_core.concept_classifier import (
        ConceptClassifier,
        ConceptClassifierConfig,
        save_concept_classifier,
    )
    from ddr_core.records import make_record, read_record, write_record
    from ddr_resources.resources import ComputeResource, DdrStorage

    defs = dg.Definitions(assets=[*ALL_ASSETS, feature_concepts],
                          resources={"storage": DdrStorage(), "compute": ComputeResource()})
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey("feature_concepts")
    assert graph.get(key).partitions_def.get_partition_keys() == ["toy-raw", "toy-sae"]
    assert {dg.AssetKey("timestep_stats"), dg.AssetKey("priors"), dg.AssetKey("dreams")} <= graph.get(key).parent_keys
    mapping = feature_concepts.get_partition_mapping(dg.AssetKey("priors"))
    assert mapping.downstream_partition_keys_by_upstream_partition_key["toy-raw:16-31"] == "toy-raw"
    assert not any(k.startswith("tiny") for k in mapping.downstream_partition_keys_by_upstream_partition_key)

    layout = DataLayout(tmp_path / "data", "default")
    write_stats(layout.timestep_stats_dir("toy-raw"))
    write_prompts(layout.prompts_dir("toy-world-prompts") / "prompts.jsonl")
    torch.manual_seed(0)
    save_concept_classifier(ConceptClassifier(ConceptClassifierConfig(image_size=16, channels=(8,), norm_groups=4)),
                            layout.model_dir("toy-world") / "concept_classifier")
    write_priors_and_dreams(layout.data_root, layout.stage_dir("priors", "toy-raw"), layout.stage_dir("dreams", "toy-raw"))
    write_record(layout.records_dir, make_record("timestep_stats", "toy-raw", "1", {}, {}, "stats-v1"))
    write_record(layout.records_dir, make_record("priors", "toy-raw:0-15", "1", {}, {}, "priors-v1"))
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"tolerance": 0.05, "variants": {"toy-raw": {"purity_mean": 0.75}}}))

    def run(tolerance: float | None):
        result = dg.materialize(
            [feature_concepts], partition_key="toy-raw", raise_on_error=False,
            resources={"storage": DdrStorage(data_root=str(layout.data_root))},
            run_config={"ops": {"feature_concepts": {"config": {"examples": "top_peak", "baseline_path": str(baseline),
                                                                "baseline_tolerance": tolerance}}}})
        assert result.success
        event = result.get_asset_materialization_events()[0]
        meta = {k: v.value for k, v in event.materialization.metadata.items()}
        check = result.get_asset_check_evaluations()[0]
        return meta, check

    meta, check = run(None)
    assert meta["channels"] == 4 and meta["channels_scored"] == 2 and meta["purity_mean"] == 0.6806  # colour, shape and background (the config)
    assert meta["basis"] == "raw" and "toy-raw raw 2" in rendered_text(meta["purity_raw_vs_sae"])
    assert set(meta["upstream_versions"]) == {"timestep_stats/toy-raw", "priors/toy-raw:0-15"}
    assert check.check_name == CHECK_NAME and not check.passed
    assert "purity_mean 0.6806 < baseline 0.7500 - 0.05" in check.description
    record = read_record(layout.records_dir, "feature_concepts", "toy-raw")
    assert record["outputs"]["figures"]["purity_mean"] == pytest.approx(0.6806, abs=1e-4)
    _, check = run(0.1)
    assert check.passed


def test_basis_gap_is_sae_minus_raw_with_an_interval() -> None:
    from ddr_core.feature_concepts import basis_gap

    raw = pl.DataFrame({"purity": [0.5, 0.5, 0.5, None], "purity_excess": [0.0, 0.0, 0.0, None],
                        "n_concepts": [0, 0, 1, 0]})
    sae = pl.DataFrame({"purity": [0.75, 0.75, 0.75], "purity_excess": [0.25, 0.25, 0.25], "n_concepts": [1, 1, 1]})
    gap = basis_gap(raw, sae, resamples=500)
    assert gap["purity"] == {"sae": 0.75, "raw": 0.5, "gap": 0.25, "interval": [0.25, 0.25]}
    # selective share over the scored channels only (the unscored fourth raw channel is left out): 1 - 1/3
    assert gap["selective_share"]["gap"] == pytest.approx(2 / 3)
    assert gap["selective_share"]["interval"][0] >= 0.0 and gap["selective_share"]["interval"][1] == pytest.approx(1.0)


@pytest.mark.parametrize(("text", "says"), [
    ('{"variants": {}', r"invalid JSON \(Expecting ',' delimiter\) at line 1 column 16"),
    ('{"variants": ' + "[" * 100_000 + "]" * 100_000 + "}", r"invalid JSON \(nested too deeply\)"),
    ('{"tolerance": 0.05, "tolerance": 0.5, "variants": {}}', r"duplicate key 'tolerance'"),
    ('{"tolerance": ' + "1" * 5000 + "}", r"invalid JSON \(a number too long to read\)"),
], ids=["truncated", "nested", "repeated-key", "long-number"])
def test_a_hand_edited_baseline_is_refused_naming_the_file_and_the_fix(tmp_path: Path, text: str, says: str) -> None:
    """The baseline is a committed file people edit: a mistake in it names the file, where, and the fix (it raised
    a bare JSONDecodeError / RecursionError, or kept the second of two values silently)."""
    path = tmp_path / "baseline.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"baseline\.json: {says}; fix the file by hand or rewrite it with "
                                         r"`python -m ddr_core\.feature_concepts baseline"):
        load_baseline(path)


def test_the_demo_shows_the_most_selective_channels() -> None:
    """make demo makes priors and dreams for the channels with a verdict and the lowest q (not channels 0-15)."""
    from dagster_project.demo import most_selective_channels

    table = pl.DataFrame({"channel": [0, 1, 2, 3, 4], "n_concepts": [0, 1, 2, 1, 1],
                          "q_colour": [0.5, 0.04, 0.001, None, 0.02], "q_shape": [0.9, 0.3, 0.01, 0.03, 0.02]})
    assert most_selective_channels(table, FAMILIES, 2) == ([2, 4], 4)  # q 0.001 and 0.02; channel 0 has no verdict
    assert most_selective_channels(table, FAMILIES, 10) == ([1, 2, 3, 4], 4)
    assert most_selective_channels(table.with_columns(pl.lit(0).alias("n_concepts")), FAMILIES, 3) == ([], 0)


def test_the_committed_baseline_passes_on_a_real_demo() -> None:
    """Set DDR_TEST_DEMO_ROOT to a data root made by `make demo` of this commit to run this: the committed baseline
    (config/feature_concepts_baseline.json) must pass on that demo's feature_concepts summaries. A baseline left
    from before a scoring change (here: the dream figures from before no-op dreams were dropped) makes the demo's
    own `feature_concepts_baseline` check fail on every fresh demo, while the console says "ok"."""
    import os

    root = os.environ.get("DDR_TEST_DEMO_ROOT")
    if not root:
        pytest.skip("DDR_TEST_DEMO_ROOT is not set to a demo data root")
    baseline = load_baseline()
    failures = []
    for variant in sorted(baseline["variants"]):
        path = Path(root) / "outputs" / "default" / "feature_concepts" / variant / "summary.json"
        assert path.is_file(), f"{path} is missing: is {root} a finished `make demo` data root?"
        result = check_against_baseline(json.loads(path.read_text(encoding="utf-8"))["figures"], baseline, variant)
        if not result["passed"]:
            failures.append(f"{variant}: {result['description']}")
    assert not failures, "; ".join(failures)


def test_the_demo_line_says_when_the_pairs_cannot_reach_a_small_p(tmp_path: Path) -> None:
    """The demo's ground-truth line adds the smallest p the selective pairs allow (``p_floor``) where it is above
    0.001, so "p 0.09" over 7 SAE dream pairs reads as the floor it is (1/12), and says nothing where it is not."""
    from dagster_project.demo import ground_truth_lines

    def section(rate: float, p: float, floor: float) -> dict:
        return {"selective": {"rate": rate, "interval": [0.5, 1.0], "n_units": 7, "chance": 0.4, "p_value": p,
                              "p_floor": floor}, "families": {}}

    summary = {"purity": {"overall": {"mean": 0.55, "interval": [0.54, 0.56]}, "chance": {"mean": 0.44},
                          "excess": {"mean": 0.11, "interval": [0.1, 0.12]}},
               "significance": {"selective_channels": 7, "channels_scored": 20, "alpha": 0.05},
               "agreement": {"dream": section(0.79, 1 / 12, 1 / 12), "prior": section(0.5, 0.11, 0.00034)}}
    layout = DataLayout(tmp_path, "default")
    folder = layout.stage_dir("feature_concepts", "toy-sae")
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    pl.DataFrame({"channel": [0]}).write_parquet(folder / "feature_concepts.parquet")
    lines = ground_truth_lines(layout, ["toy-sae"])
    dreams = next(line for line in lines if line.startswith("    dreams:"))
    priors = next(line for line in lines if line.startswith("    priors:"))
    assert "(chance 0.40, p 0.08; the smallest p these pairs allow: 0.083); all channels:" in dreams
    assert "smallest" not in priors and "(chance 0.40, p 0.11); all channels:" in priors
