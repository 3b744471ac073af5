"""The feature_matches asset, its comparisons config, the capture checks and the Results API (synthetic captures of
the toy variants with known answers: no model runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from ddr_core.activation_store import ActivationStore, VariantBatch
from ddr_core.config import ConfigError, load_project_config
from ddr_core.records import make_record, write_record

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [json.loads(line)["text"] for line in (ROOT / "datasets/toy-world/prompts.jsonl").read_text().splitlines()]
PERMUTATION = np.random.default_rng(7).permutation(64)


def _write_capture(data_root: Path, group: str, variants: dict[str, np.ndarray], per_prompt: int = 2,
                   seed_offset: int = 0) -> None:
    store = ActivationStore(data_root / "outputs" / "default" / "activations" / group)
    generations = [{"generation_id": p * per_prompt + i, "prompt_index": p, "prompt": text, "image_index": i,
                    "seed": 1000 + p * per_prompt + i + seed_offset, "image_path": ""}
                   for p, text in enumerate(PROMPTS) for i in range(per_prompt)]
    store.write_batch(0, generations, [900, 500, 100], {k: VariantBatch(v) for k, v in variants.items()})
    store.finalize()
    write_record(data_root / "outputs" / "default" / "_records", make_record(
        "activations", group, "test", {}, {}, f"synthetic-{group}"))


def _toy_activations(per_prompt: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """raw (g, 3, 64) with a prompt-level signal per channel; sae (g, 3, 256): its first 64 features are the raw
    channels permuted, the other 192 noise."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(len(PROMPTS)), per_prompt)
    raw = rng.standard_normal((len(PROMPTS), 64))[groups][:, None, :] + 0.2 * rng.standard_normal((groups.size, 3, 64))
    sae = np.concatenate([raw[:, :, PERMUTATION], rng.standard_normal((groups.size, 3, 192))], axis=2)
    return raw.astype(np.float32), sae.astype(np.float32)


@pytest.fixture()
def toy_root(tmp_path: Path) -> Path:
    raw, sae = _toy_activations()
    _write_capture(tmp_path, "toy-world", {"toy-raw": raw, "toy-sae": sae})
    prompts = tmp_path / "assets" / "prompts" / "toy-world-prompts"
    prompts.mkdir(parents=True)
    shutil.copy(ROOT / "datasets/toy-world/prompts.jsonl", prompts / "prompts.jsonl")
    shutil.copytree(ROOT / "models/toy-world-sae", tmp_path / "assets" / "saes" / "toy-world-sae")
    return tmp_path


def _materialize(data_root: Path, key: str, config: dict | None = None) -> dg.ExecuteInProcessResult:
    from ddr_assets import feature_matches
    from ddr_resources.resources import DdrStorage

    return dg.materialize([feature_matches], partition_key=key, instance=dg.DagsterInstance.ephemeral(),
                          resources={"storage": DdrStorage(data_root=str(data_root))},
                          run_config={"ops": {"feature_matches": {"config": config}}} if config else None,
                          raise_on_error=False)


def test_the_asset_matches_raw_channels_with_their_sae_copies(toy_root: Path) -> None:
    result = _materialize(toy_root, "toy-raw__toy-sae", {"n_permutations": 49})
    assert result.success
    event = result.get_asset_materialization_events()[0]
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["matched_a"] == 64 and metadata["vanished_a"] == 0
    # the 64 copies are matched; of the 192 noise features a few may pass (BH controls the false discovery rate)
    assert 64 <= metadata["matched_b"] <= 70 and metadata["appeared_b"] + metadata["matched_b"] == 256
    assert "| A | B | r |" in metadata["top_pairs"]
    assert metadata["config"]["n_permutations"] == 49 and metadata["config"]["alpha"] == 0.05
    from ddr_core.feature_matching_stage import read_matches

    found = read_matches(toy_root / "outputs/default/feature_matches/toy-raw__toy-sae")
    assert found["a"]["best"].to_list() == np.argsort(PERMUTATION).tolist()
    assert found["b"]["status"].head(64).to_list() == ["matched"] * 64
    assert found["a"]["r"].min() > 0.999
    assert found["summary"]["directions"]["null_threshold_a"] > 0  # one model and layer: decoder rows compared
    assert found["directions"].height == 64
    assert set(found["concepts"]["family"].to_list()) == {"colour", "shape", "background"}
    record = json.loads((toy_root / "outputs/default/_records/feature_matches/toy-raw__toy-sae.json").read_text())
    assert record["upstream"] == {"activations/toy-world": "synthetic-toy-world"}


def test_the_asset_names_the_missing_capture(tmp_path: Path) -> None:
    result = _materialize(tmp_path, "toy-raw__toy-sae")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "activations[toy-world]" in str(failure.event_specific_data.error)


def test_two_captures_with_other_seeds_are_refused_before_matching(tmp_path: Path) -> None:
    from ddr_core.feature_matching_stage import CaptureMismatchError, feature_matches_for_comparison
    from ddr_core.paths import DataLayout

    raw, _ = _toy_activations()
    _write_capture(tmp_path, "toy-world", {"toy-raw": raw})
    _write_capture(tmp_path, "toy-world-no-yellow", {"toy-noyellow-raw": raw}, seed_offset=5)
    layout = DataLayout(tmp_path)
    out = layout.stage_dir("feature_matches", "toy-raw__toy-noyellow-raw")
    with pytest.raises(CaptureMismatchError, match="seed 1000 vs prompt .* seed 1005; materialize both captures"):
        feature_matches_for_comparison(load_project_config(), layout, "toy-raw__toy-noyellow-raw", out)
    assert not out.exists()


def test_two_models_captured_alike_are_matched_and_the_missing_feature_vanishes(tmp_path: Path) -> None:
    from ddr_core.feature_matching_stage import feature_matches_for_comparison
    from ddr_core.paths import DataLayout
    from ddr_core.results import Results

    raw, _ = _toy_activations()
    other = raw[:, :, PERMUTATION].copy()
    other[:, :, 0] = np.random.default_rng(3).standard_normal(other.shape[:2])  # B lost A's channel PERMUTATION[0]
    _write_capture(tmp_path, "toy-world", {"toy-raw": raw})
    _write_capture(tmp_path, "toy-world-no-yellow", {"toy-noyellow-raw": other})
    shutil.copytree(ROOT / "datasets/toy-world", tmp_path / "assets/prompts/toy-world-prompts")
    layout = DataLayout(tmp_path)
    name = "toy-raw__toy-noyellow-raw"
    summary = feature_matches_for_comparison(load_project_config(), layout, name,
                                             layout.stage_dir("feature_matches", name))
    assert summary["counts_a"] == {"matched": 63, "vanished": 1, "silent": 0}
    assert summary["directions"] is None  # two models: no shared space
    results = Results(tmp_path)
    assert results.comparisons() == [name]
    a = results.feature_matches(name)
    assert a.filter(pl.col("status") == "vanished")["feature"].to_list() == [int(PERMUTATION[0])]
    assert results.feature_matches(name, "b").height == 64
    with pytest.raises(ValueError, match="unknown feature_matches table"):
        results.feature_matches(name, "nope")


@pytest.mark.parametrize(("name", "message"), [
    ("toy-raw_toy-sae", "is not '<variant A>__<variant B>'"),
    ("toy-raw__toy-sae__tiny-raw", "is not '<variant A>__<variant B>'"),
    ("Toy-raw__toy-sae", "is not '<variant A>__<variant B>'"),
    ("toy-raw___toy-sae", "is not '<variant A>__<variant B>'"),
    ("toy-raw__nope", "unknown variant 'nope'"),
    ("toy-raw__toy-raw", "with itself"),
    ("toy-raw__tiny-raw", "point both variants at one prompt dataset"),
])
def test_a_bad_comparison_fails_at_config_load_naming_the_fix(tmp_path: Path, name: str, message: str) -> None:
    text = (ROOT / "config/ddr.yaml").read_text(encoding="utf-8")
    path = tmp_path / "ddr.yaml"
    path.write_text(text + f"  {name}: {{}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_project_config(path)


def test_an_unknown_matching_setting_fails_at_config_load(tmp_path: Path) -> None:
    text = (ROOT / "config/ddr.yaml").read_text(encoding="utf-8")
    path = tmp_path / "ddr.yaml"
    path.write_text(text + "  toy-sae__toy-raw: {matching: {n_permutation: 5}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"comparisons\.toy-sae__toy-raw\.matching\.n_permutation: unknown field"):
        load_project_config(path)


def test_profiles_keep_only_their_comparisons() -> None:
    project = load_project_config()
    assert "toy-raw__toy-sae" in project.for_profile("default").comparisons
    assert "toy-raw__toy-noyellow-raw" not in project.for_profile("default").comparisons
    assert set(project.for_profile("toy-diff").comparisons) == {"toy-raw__toy-sae", "toy-raw__toy-noyellow-raw",
                                                                "toy-sae__toy-noyellow-raw", "toy-sae__toy-seed1-raw",
                                                                "toy-raw__toy-seed1-raw"}


def test_the_ablated_world_keeps_the_vocabulary_and_never_shows_yellow() -> None:
    from ddr_core.toy_world import ToyWorldConfig, sample_scenes, world_prompts, world_vocabulary

    assert world_vocabulary("shapes-no-yellow") == world_vocabulary("shapes")
    assert len(world_prompts("shapes-no-yellow")) == 27
    assert not any("yellow" in p for p in world_prompts("shapes-no-yellow"))
    scenes = sample_scenes(54, 0, ToyWorldConfig(world="shapes-no-yellow"))
    assert {s.colour for s in scenes} == {"red", "green", "blue"} and len({s.prompt for s in scenes[:27]}) == 27


def test_the_demo_matches_its_variants_before_the_report() -> None:
    from dagster_project.demo import demo_plan

    plan = dict(demo_plan(["toy-raw", "toy-sae"]))
    names = list(plan)
    assert plan["feature_matches"] == ["toy-raw__toy-sae"]
    assert names.index("activations") < names.index("feature_matches") < names.index("html_export")
    assert dict(demo_plan(["toy-raw"]))["feature_matches"] == []


def test_the_two_model_diff_runs_only_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster_project import demo

    with pytest.raises(SystemExit, match="DDR_PROFILE=toy-diff"):  # the default profile does not offer it
        demo.comparison_plan("toy-raw__toy-noyellow-raw")
    monkeypatch.setattr(demo, "project", lambda: load_project_config().for_profile("toy-diff"))
    assert demo.comparison_plan("toy-raw__toy-noyellow-raw") == [
        ("models", ["toy-world", "toy-world-no-yellow"]), ("saes", []), ("prompt_datasets", ["toy-world-prompts"]),
        ("activations", ["toy-world", "toy-world-no-yellow"]), ("feature_matches", ["toy-raw__toy-noyellow-raw"])]
    # captured alike: the second model's capture settings are the shipped model's
    assert demo.DEMO_MODEL_RUN_CONFIG["toy-world-no-yellow"] == demo.DEMO_MODEL_RUN_CONFIG["toy-world"]
