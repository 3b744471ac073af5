"""Automatic labels with a detection score (ddr_core.labels): known answers of the score, the concept-classifier
labeller on rendered toy-world images, and the CLIP labeller's plumbing (a tiny random CLIP served by the loopback
fake hub, provisioned by the real download code)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ddr_core.labels import (
    FeatureLabelsConfig,
    balanced_accuracy,
    choose_negatives,
    detection_test,
    label_features,
    match_test,
    split_by_prompt,
    summarise_labels,
)
from ddr_core.labels.toy import ConceptClassifierLabeller
from ddr_core.toy_world import parse_prompt, world_prompts

FAMILIES = ["colour", "shape", "background"]
PROMPTS = list(world_prompts())


class _Heads:
    """A stand-in classifier with the toy world's heads (encode is not used: rows are built from the truth)."""

    def __init__(self) -> None:
        from ddr_core.toy_world import CONCEPTS

        self.config = type("Config", (), {"heads": {f: list(CONCEPTS[f]) for f in FAMILIES}})()


def _truth_rows(labeller: ConceptClassifierLabeller) -> tuple[np.ndarray, dict[int, int]]:
    """One image (generation id = prompt index) per world prompt, encoded as the classifier would if it were right."""
    encoded = np.zeros((len(PROMPTS), len(labeller.names)))
    for row, prompt in enumerate(PROMPTS):
        for family, value in parse_prompt(prompt).items():
            if family in FAMILIES:
                encoded[row, labeller.names.index(f"{family}={value}")] = 1.0
    return encoded, {i: i for i in range(len(PROMPTS))}


def _activations(values: dict[int, np.ndarray]) -> pl.DataFrame:
    return pl.DataFrame([{"channel": c, "prompt": p, "generation_id": i, "activation": float(v[i])}
                         for c, v in values.items() for i, p in enumerate(PROMPTS)])


def test_balanced_accuracy_by_hand() -> None:
    # positives: rows 0, 2 (one of two found: TPR 1/2); negatives 1, 3, 4 (only 3 rejected: TNR 1/3)
    assert balanced_accuracy([True, True, False, False, True], [True, False, True, False, False]) == pytest.approx(
        (1 / 2 + 1 / 3) / 2)
    assert balanced_accuracy([True, False], [True, False]) == 1.0
    assert balanced_accuracy([True, True, True], [True, False, False]) == 0.5  # "everything is it": chance
    assert math.isnan(balanced_accuracy([True, False], [True, True]))  # no negatives: no score
    with pytest.raises(ValueError, match="3 predictions for 2 truths"):
        balanced_accuracy([True, True, False], [True, False])


def test_split_is_by_prompt_disjoint_and_seeded() -> None:
    prompts = ["a", "b", "a", "c", "d", "e", "b"]
    labelling, held_out = split_by_prompt(prompts, seed=3)
    assert not set(labelling) & set(held_out) and set(labelling) | set(held_out) == set("abcde")
    assert (len(labelling), len(held_out)) == (2, 3)
    assert split_by_prompt(prompts, seed=3) == (labelling, held_out)


def test_detection_test_null_and_interval() -> None:
    perfect = detection_test([True] * 5 + [False] * 10, [True] * 5 + [False] * 10)
    assert perfect["score"] == 1.0 and perfect["interval"] == (1.0, 1.0)
    assert perfect["p_value"] == pytest.approx(1 / math.comb(15, 5))  # one of C(15, 5) label placements
    # by hand: 2 positives, 2 negatives, predictions [T, F | T, F]: X = 1 true positive of m = 2 predicted;
    # P(X >= 1) = 1 - P(X = 0) = 1 - C(2,0) C(2,2) / C(4,2) = 5/6
    assert detection_test([True, False, True, False], [True, True, False, False])["p_value"] == pytest.approx(5 / 6)
    # an unrelated label: permutation p-values are about uniform, scores centre on chance 0.5
    rng = np.random.default_rng(0)
    runs = [detection_test(rng.random(15) < 0.4, [True] * 5 + [False] * 10, resamples=200, seed=s)
            for s in range(200)]
    assert abs(np.mean([r["score"] for r in runs]) - 0.5) < 0.03
    assert np.mean([r["p_value"] < 0.05 for r in runs]) < 0.1
    low, high = runs[0]["interval"]
    assert low <= runs[0]["score"] <= high


def test_negatives_come_from_below_the_quantile_hard_ones_first() -> None:
    ranked = [f"p{i}" for i in range(10)]
    activations = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    hard, easy = choose_negatives(ranked, activations, ["p0", "p1"], 4, quantile=0.5, hard_share=0.5, seed=0)
    assert hard == ["p5", "p6"]  # the highest activators of the pool at or below the median (5.5)
    assert len(easy) == 2 and set(easy) <= {"p7", "p8", "p9"}
    hard, _ = choose_negatives(ranked, activations, ["p0"], 4, quantile=0.5, hard_share=0.5, seed=0,
                               hard_candidates=["p9", "p2"])
    assert hard == ["p9"]  # only candidates inside the pool (p2 activates too much)


def test_a_one_concept_feature_gets_its_label_and_a_random_one_chance() -> None:
    """Known answer: a feature that fires on exactly the red prompts is labelled colour=red with a detection score
    of 1 and a significant verdict; features with random activations score about 0.5 and are not significant."""
    labeller = ConceptClassifierLabeller(_Heads())
    encoded, row_of = _truth_rows(labeller)
    rng = np.random.default_rng(1)
    red = np.asarray([parse_prompt(p)["colour"] == "red" for p in PROMPTS])
    values = {0: red * 5.0 + rng.random(len(PROMPTS))}
    values.update({c: rng.random(len(PROMPTS)) for c in range(1, 41)})
    labels = pl.DataFrame([{"prompt": p, **{f: parse_prompt(p)[f] for f in FAMILIES}} for p in PROMPTS])
    config = FeatureLabelsConfig(n_top=int(red.sum()), permutations=500, bootstrap_resamples=200)
    table = label_features(_activations(values), encoded, row_of, labeller, range(41), config, labels=labels,
                           families=FAMILIES, concepts={0: "colour=red", 1: ""})
    first = table.row(0, named=True)
    assert first["label"] == "colour=red" and first["score"] == 1.0 and first["significant"]
    assert first["label_matches"] is True and first["n_hard"] > 0 and first["tnr_hard"] == 1.0
    assert first["score_low"] == 1.0 and first["score_high"] == 1.0
    random = table.filter(pl.col("channel") > 0)
    assert abs(random["score"].mean() - 0.5) < 0.08
    assert random["significant"].sum() <= 1
    assert table.row(1, named=True)["label_matches"] is None  # no concept: nothing to check against
    summary = summarise_labels(table, config)
    assert summary["scored"] == 41 and summary["chance"] == 0.5
    assert summary["truth"]["channels_with_concept"] == 1 and summary["truth"]["match"]["rate"] == 1.0


def test_top_examples_of_a_sparse_feature_are_only_prompts_that_activate_it() -> None:
    """A sparse feature (an SAE feature: exactly 0 on most prompts) fires on 3 or 6 red prompts only. Its "top
    examples" must be prompts that activate it: a prompt at 0 is at the negatives' quantile, so it cannot be a
    held-out positive too (before, the top 10 were padded with zero prompts, tied with the negatives and ordered by
    generation id, and the feature got a label read off images that do not activate it)."""
    labeller = ConceptClassifierLabeller(_Heads())
    encoded, row_of = _truth_rows(labeller)
    red = [i for i, p in enumerate(PROMPTS) if parse_prompt(p)["colour"] == "red"]
    values = {0: np.zeros(len(PROMPTS)), 1: np.zeros(len(PROMPTS))}
    values[0][red[:3]] = 5.0
    values[1][red[:6]] = 5.0 + np.arange(6) / 10
    config = FeatureLabelsConfig(n_top=10, permutations=500, bootstrap_resamples=200)
    table = label_features(_activations(values), encoded, row_of, labeller, [0, 1], config)
    three, six = table.row(0, named=True), table.row(1, named=True)
    assert three["label"] is None and three["score"] is None  # 3 activating prompts: fewer than 4, no label
    assert six["n_labelling"] + six["n_positive"] == 6 and six["label"] == "colour=red"
    assert six["tpr"] == 1.0  # every held-out positive is a red prompt that fires


def test_match_test_against_labels_permuted_among_channels() -> None:
    labels = ["colour=red", "shape=circle", "background=black", "colour=blue"]
    concepts = ["colour=red", "shape=circle, colour=green", "background=black", "colour=blue"]
    result = match_test(labels, concepts, permutations=2000)
    assert result["rate"] == 1.0 and result["chance"] == pytest.approx(0.25, abs=0.03)
    assert result["p_value"] == pytest.approx(1 / 24, abs=0.015)  # one of 4! permutations matches all
    assert match_test([], [])["rate"] is None


def test_concept_classifier_labeller_reads_rendered_images() -> None:
    """The shipped toy-world classifier as a labeller: rendered images of blue prompts are labelled with a blue
    concept (or their shared shape / background when the split drew only those) and detected against others."""
    from ddr_core.concept_classifier import load_concept_classifier
    from ddr_core.toy_world import ToyWorldConfig, make_dataset

    folder = Path(__file__).resolve().parents[1] / "models" / "toy-world" / "concept_classifier"
    labeller = ConceptClassifierLabeller(load_concept_classifier(folder))
    data = make_dataset(48, seed=5, config=ToyWorldConfig(image_size=32))
    images = [((img.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8) for img in data.images]
    encoded = labeller.encode(images)
    assert encoded.shape == (48, len(labeller.names)) and np.all(encoded.sum(axis=1) == len(labeller.families))
    colours = [parse_prompt(p)["colour"] for p in data.prompts]
    blue = np.flatnonzero(np.asarray(colours) == "blue")
    other = np.flatnonzero(np.asarray(colours) != "blue")
    assert labeller.label(encoded, blue) == "colour=blue"
    assert labeller.detect("colour=blue", encoded, blue).mean() > 0.9
    assert labeller.detect("colour=blue", encoded, other).mean() < 0.1
    with pytest.raises(ValueError, match="not one of this classifier's values"):
        labeller.detect("colour=purple", encoded, blue)


# ---- the CLIP labeller: plumbing only (a tiny random CLIP says nothing about real labels) ----------------------

CLIP_REPO = "acme/tiny-clip"
VOCABULARY = ["a red shape", "a blue shape", "a green square"]


def _tiny_clip_files(folder: Path) -> dict[str, bytes]:
    """A random CLIP built from a transformers CLIPConfig (seeded) and a word tokenizer, saved with save_pretrained:
    the files a hub repo like openai/clip-vit-base-patch32 holds."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from ddr_core.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(["a", "red", "blue", "green", "shape", "square"], folder)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def clip_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants as hf_constants

    from tests.fake_remote import FakeRemote

    for name in ("HF_TOKEN", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    hf_home = tmp_path / "hf_home"
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    server = FakeRemote()
    server.add_hub_repo(CLIP_REPO, _tiny_clip_files(tmp_path / "built"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


def _clip_entry(vocabulary: list[str]) -> object:
    from ddr_core.config import LabellerConfig

    return LabellerConfig.model_validate({"kind": "clip", "vocabulary": vocabulary,
                                          "source": {"hub": {"repo_id": CLIP_REPO, "revision": "main"}}})


def test_clip_labeller_is_provisioned_through_the_hub_and_labels_from_its_vocabulary(clip_hub, tmp_path: Path) -> None:
    """The clip labeller downloads its weights with the real provisioning code (fake hub on loopback: manifest
    written, a second build skips the download), loads them with transformers, preprocesses without torchvision,
    and its labels are vocabulary entries whose detection runs through label_features. A random CLIP: plumbing only."""
    import sys

    from ddr_core.labels import LabellerContext, make_labeller
    from ddr_core.labels.clip import labeller_dir
    from ddr_core.paths import DataLayout
    from ddr_core.provisioning import MANIFEST_NAME

    layout = DataLayout(tmp_path / "data")
    context = LabellerContext(name="tiny-clip", config=_clip_entry(VOCABULARY), layout=layout)
    labeller = make_labeller(context)
    folder = labeller_dir(layout, "tiny-clip")
    assert (folder / MANIFEST_NAME).is_file() and (folder / "model.safetensors").is_file()
    assert any("/resolve/main/model.safetensors" in path for path, _ in clip_hub.requests)
    assert "torchvision" not in sys.modules
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(12)]
    encoded = labeller.encode(images)
    assert encoded.shape == (12, 3) and np.allclose(encoded.sum(axis=1), 1.0)
    assert np.ptp(encoded, axis=0).max() > 0  # the images are told apart
    label = labeller.label(encoded, np.arange(6))
    assert label in VOCABULARY
    detected = labeller.detect(label, encoded, np.arange(12))
    assert detected.dtype == bool
    assert np.array_equal(detected, encoded.argmax(axis=1) == VOCABULARY.index(label))  # top_k 1: the top entry
    activations = pl.DataFrame([{"channel": 0, "prompt": f"p{i}", "generation_id": i, "activation": float(12 - i)}
                                for i in range(12)])
    table = label_features(activations, encoded, {i: i for i in range(12)}, labeller, [0],
                           FeatureLabelsConfig(n_top=4, bootstrap_resamples=100))
    assert table["label"][0] in VOCABULARY and table["n_positive"][0] == 2 and table["n_negative"][0] == 4

    clip_hub.requests.clear()
    make_labeller(context)  # intact copy: no download
    assert not any("/resolve/" in path for path, _ in clip_hub.requests)


def test_clip_preprocessing_resizes_crops_and_normalises() -> None:
    from ddr_core.labels.clip import CLIP_MEAN, CLIP_STD, preprocess

    grey = np.full((20, 60, 3), 128, dtype=np.uint8)
    out = preprocess([grey], 32)
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    expected = (128 / 255 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    assert np.allclose(out[0].mean(axis=(1, 2)), expected, atol=1e-3)
    half = np.zeros((32, 64, 3), dtype=np.uint8)
    half[:, 32:] = 255  # the centre crop of a 2:1 image keeps its middle: half dark, half bright
    crop = preprocess([half], 32)[0, 0]
    assert crop[:, :14].max() < 0 < crop[:, 18:].min()


@pytest.mark.parametrize(("entry", "message"), [
    ({"kind": "clip", "vocabulary": ["a", "b"]}, "needs `source:`"),
    ({"kind": "clip", "vocabulary": ["a"], "source": {"hub": {"repo_id": "a/b"}}}, "2 or more"),
    ({"kind": "clip", "vocabulary": ["a dog", "a\x1b[31mcat"], "source": {"hub": {"repo_id": "a/b"}}},
     r"vocabulary\[1\]"),
    ({"kind": "clip", "vocabulary": ["a dog", "a dog"], "source": {"hub": {"repo_id": "a/b"}}}, "repeats"),
    ({"kind": "clip", "vocabulary": ["a dog", " "], "source": {"hub": {"repo_id": "a/b"}}}, "empty"),
    ({"kind": "concept-classifier", "vocabulary": ["a dog", "a cat"]}, "leave out"),
    ({"kind": "clip", "vocabulary": ["a dog", "a cat"], "top_k": 2, "source": {"hub": {"repo_id": "a/b"}}},
     "would accept every"),
    ({"kind": "sam"}, "kind"),
])
def test_labeller_config_is_validated(entry: dict, message: str) -> None:
    from pydantic import ValidationError

    from ddr_core.config import LabellerConfig

    with pytest.raises(ValidationError, match=message):
        LabellerConfig.model_validate(entry)


def test_a_model_naming_an_unknown_labeller_is_refused() -> None:
    import yaml

    from ddr_core.config import DEFAULT_CONFIG_PATH, ProjectConfig

    data = yaml.safe_load(Path(DEFAULT_CONFIG_PATH).read_text(encoding="utf-8"))
    assert ProjectConfig.model_validate(data).models["toy-world"].labeller == "toy-concepts"
    data["models"]["toy-world"]["labeller"] = "clip-vit-b23"
    with pytest.raises(ValueError, match="models.toy-world.labeller: unknown labeller 'clip-vit-b23'"):
        ProjectConfig.model_validate(data)


# ---- the stage and the asset on a hand-made capture ----------------------------------------------------------


def _hand_made_capture(tmp_path: Path):
    """The toy world's 36 prompts, one 16 px image each (colour fill, shape grey in the top-left block: what
    tests.test_feature_concepts.RuleClassifier reads), in a real activation store of toy-raw (64 channels):
    channel 0 fires on the red prompts, channel 1 at random, the others never."""
    from ddr_core.activation_store import ActivationStore, VariantBatch
    from ddr_core.config import load_project_config
    from ddr_core.paths import DataLayout
    from tests.test_feature_concepts import _png, write_prompts

    project = load_project_config()
    layout = DataLayout(tmp_path / "data", "default")
    store = ActivationStore(layout.activations_dir(project.capture_of("toy-raw")))
    rows, values = [], np.zeros((len(PROMPTS), 1, 64), dtype=np.float32)
    rng = np.random.default_rng(0)
    for g, prompt in enumerate(PROMPTS):
        parsed = parse_prompt(prompt)
        image = _png(layout.data_root, f"outputs/default/activations/toy/images/gen_{g:07d}.png", parsed["colour"],
                     parsed["shape"])
        rows.append({"generation_id": g, "prompt_index": g, "prompt": prompt, "image_index": 0, "seed": g,
                     "image_path": image})
        values[g, 0, 0] = 5.0 * (parsed["colour"] == "red") + rng.random()
        values[g, 0, 1] = rng.random()
    store.write_batch(0, rows, [501], {"toy-raw": VariantBatch(values)})
    store.finalize()
    stats = layout.timestep_stats_dir("toy-raw")
    stats.mkdir(parents=True)
    pl.DataFrame({"channel": pl.Series([0, 1], dtype=pl.Int32), "peak_rank": pl.Series([0, 0], dtype=pl.Int32),
                  "observed_timestep": pl.Series([501, 501], dtype=pl.Int64)}).write_parquet(
        stats / "activity_peaks.parquet")
    (stats / "summary.json").write_text('{"width": 64, "config_hash": "stats0"}')
    write_prompts(layout.prompts_dir("toy-world-prompts") / "prompts.jsonl")
    return project, layout


def test_stage_labels_a_planted_red_channel_from_its_images(tmp_path: Path) -> None:
    """feature_labels_for_variant end to end (store ranking, images read off disk, the labeller, the output folder):
    the red channel is labelled colour=red with a perfect, significant score; the random one is not significant."""
    from ddr_core.labels import feature_labels_for_variant, read_feature_labels
    from tests.test_feature_concepts import RuleClassifier

    project, layout = _hand_made_capture(tmp_path)
    labeller = ConceptClassifierLabeller(RuleClassifier(), families=["colour", "shape"])
    red = sum(parse_prompt(p)["colour"] == "red" for p in PROMPTS)
    table, summary, out = feature_labels_for_variant(project, layout, "toy-raw", FeatureLabelsConfig(n_top=red),
                                                     labeller=labeller)
    assert out == layout.stage_dir("feature_labels", "toy-raw") and read_feature_labels(out)[1]["scored"] == 2
    first = table.row(0, named=True)
    assert first["label"] == "colour=red" and first["score"] == 1.0 and first["significant"]
    assert first["concept"] is None and first["label_matches"] is None  # no feature_concepts verdicts to check
    assert not table.row(1, named=True)["significant"] and table.height == 64 and summary["scored"] == 2
    with pytest.raises(ValueError, match="names no labeller"):
        feature_labels_for_variant(project, layout, "tiny-raw")


def test_the_asset_materializes_with_a_labels_table(tmp_path: Path) -> None:
    import dagster as dg
    import torch

    from ddr_assets import ALL_ASSETS
    from ddr_assets.feature_labels import feature_labels
    from ddr_core.concept_classifier import (
        ConceptClassifier,
        ConceptClassifierConfig,
        save_concept_classifier,
    )
    from ddr_core.records import make_record, read_record, write_record
    from ddr_resources.resources import ComputeResource, DdrStorage
    from tests.markdown_check import rendered_text

    defs = dg.Definitions(assets=ALL_ASSETS, resources={"storage": DdrStorage(), "compute": ComputeResource()})
    dg.Definitions.validate_loadable(defs)
    node = defs.resolve_asset_graph().get(dg.AssetKey("feature_labels"))
    assert node.partitions_def.get_partition_keys() == ["toy-raw", "toy-sae"]  # the profile's labeller variants
    assert dg.AssetKey("feature_concepts") in node.parent_keys

    _, layout = _hand_made_capture(tmp_path)
    torch.manual_seed(0)
    save_concept_classifier(ConceptClassifier(ConceptClassifierConfig(image_size=16, channels=(8,), norm_groups=4)),
                            layout.model_dir("toy-world") / "concept_classifier")
    write_record(layout.records_dir, make_record("timestep_stats", "toy-raw", "1", {}, {}, "stats-v1"))
    result = dg.materialize([feature_labels], partition_key="toy-raw", raise_on_error=False,
                            resources={"storage": DdrStorage(data_root=str(layout.data_root))})
    assert result.success
    meta = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}
    assert meta["features"] == 64 and meta["features_scored"] == 2 and meta["chance"] == 0.5
    assert meta["labeller"] == "toy-concepts (concept-classifier)"
    assert "| feature | label | score |" in meta["labels"] and "colour=" in rendered_text(meta["labels"])
    assert read_record(layout.records_dir, "feature_labels", "toy-raw")["outputs"]["scored"] == 2


def test_the_labels_data_version_follows_hand_scored_concepts(tmp_path: Path) -> None:
    """feature_concepts written without a completion record (scored by hand): the labels read its verdicts, so a
    change of those verdicts changes the labels' data version (before, the missing record was swallowed and the
    version stayed, leaving downstream unaware)."""
    import dagster as dg
    import torch

    from ddr_assets.feature_labels import feature_labels
    from ddr_core.concept_classifier import (
        ConceptClassifier,
        ConceptClassifierConfig,
        save_concept_classifier,
    )
    from ddr_core.feature_concepts import SUMMARY_FILE, TABLE_FILE, feature_concepts_dir
    from ddr_core.records import make_record, read_record, write_record
    from ddr_resources.resources import DdrStorage

    _, layout = _hand_made_capture(tmp_path)
    torch.manual_seed(0)
    save_concept_classifier(ConceptClassifier(ConceptClassifierConfig(image_size=16, channels=(8,), norm_groups=4)),
                            layout.model_dir("toy-world") / "concept_classifier")
    write_record(layout.records_dir, make_record("timestep_stats", "toy-raw", "1", {}, {}, "stats-v1"))
    folder = feature_concepts_dir(layout, "toy-raw")
    folder.mkdir(parents=True)
    (folder / SUMMARY_FILE).write_text("{}")
    versions, concepts = [], []
    for verdict in ("colour=red", "colour=blue"):
        pl.DataFrame({"channel": [0, 1], "concept": [verdict, ""]}).write_parquet(folder / TABLE_FILE)
        result = dg.materialize([feature_labels], partition_key="toy-raw",
                                resources={"storage": DdrStorage(data_root=str(layout.data_root))})
        versions.append(read_record(layout.records_dir, "feature_labels", "toy-raw")["data_version"])
        concepts.append(pl.read_parquet(layout.stage_dir("feature_labels", "toy-raw") / "feature_labels.parquet")
                        .filter(pl.col("channel") == 0)["concept"].item())
        assert result.success
    assert concepts == ["colour=red", "colour=blue"]  # what the labels read changed ...
    assert versions[0] != versions[1]  # ... and so did their data version
    upstream = read_record(layout.records_dir, "feature_labels", "toy-raw")["upstream"]
    assert upstream["feature_concepts/toy-raw"].startswith("unrecorded-")


def test_clip_detection_is_the_label_among_the_top_k_entries() -> None:
    from ddr_core.labels.clip import ClipLabeller

    labeller = object.__new__(ClipLabeller)  # detect reads only the vocabulary and top_k (no weights needed)
    labeller.vocabulary, labeller.top_k = ["a", "b", "c"], 1
    probabilities = np.asarray([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    assert labeller.detect("b", probabilities, np.arange(3)).tolist() == [False, True, False]
    labeller.top_k = 2
    assert labeller.detect("b", probabilities, np.arange(3)).tolist() == [True, True, True]
    assert labeller.detect("a", probabilities, np.arange(3)).tolist() == [True, False, False]
