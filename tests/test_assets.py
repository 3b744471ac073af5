"""The Dagster graph end to end on the tiny model: provisioning -> activations -> stats -> plots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from dagster_project.definitions import defs
from ddr_assets.partitions import block_keys, parse_block_key
from tests.tiny_graph import asset_def, materialize, metadata, step_error

ROOT = Path(__file__).resolve().parents[1]


_asset, _materialize, _metadata, _error = asset_def, materialize, metadata, step_error


@pytest.fixture(scope="module")
def graph_run(tiny_graph):
    return tiny_graph


def test_definitions_load_and_list_every_stage():
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"models", "saes", "prompt_datasets", "activations", "timestep_stats", "activity_plots", "priors",
            "dreams", "dreams_no_noise", "representation_shards", "html_export", "dream_sweeps", "cfg_contrast"} <= keys


def test_dagster_cli_validates_the_definitions(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dagster_cli_refuses_a_misspelt_variant_override(tmp_path):
    """``make validate`` (``dagster definitions validate``) fails on an override the stage does not have, naming
    the file, the variant, the stage, the field and the nearest real one; it used to pass and the stage failed
    at run time."""
    config = tmp_path / "ddr.yaml"
    config.write_text((ROOT / "config" / "ddr.yaml").read_text().replace(
        "priors: {steer_strength_scale: 15.0}", "priors: {steer_strenght_scale: 15.0}", 1))
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "DDR_CONFIG": str(config)}
    out = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    assert str(config) in output and "variants.toy-raw.overrides" in output, output
    assert "priors.steer_strenght_scale: priors has no parameter 'steer_strenght_scale' " \
           "(did you mean 'steer_strength_scale'?)" in output, output


def test_profiles_choose_the_variants_offered_as_partitions(monkeypatch):
    """The UI offers the active profile's variants (and only the entries they use); the thesis' are one switch
    away; a profile that does not exist is refused naming DDR_PROFILE."""
    from ddr_core.config import load_project_config

    full = load_project_config()
    default = full.for_profile()
    assert "toy-raw" in default.variants and "tiny-sdxl-raw" in default.variants
    assert "style50-sae" not in default.variants and "sd-v1-4" not in default.models
    monkeypatch.setenv("DDR_PROFILE", "default,thesis")
    thesis = full.for_profile()
    assert {"style50-sae", "toy-raw"} <= set(thesis.variants) and "style50" in thesis.models
    assert sum(1 for name, first_last in ((n, b) for n, v in thesis.variants.items() for b in v.channel_blocks())
               if name == "style50-sae") == 80
    monkeypatch.setenv("DDR_PROFILE", "all")
    assert full.for_profile() is full
    monkeypatch.setenv("DDR_PROFILE", "thesys")
    with pytest.raises(ValueError, match=r"DDR_PROFILE: unknown profile\(s\) \['thesys'\]"):
        full.for_profile()


def test_channel_blocks_cover_each_variant_exactly():
    keys = block_keys()
    assert "tiny-raw:0-15" in keys and "tiny-raw:48-63" in keys and "tiny-sae:192-255" in keys
    assert not any(k.startswith("tiny-raw:64") for k in keys)  # no cells beyond a variant's width
    assert not any(k.startswith("style50-sae:") for k in keys)  # not in the default profile (needs its weights)
    with pytest.raises(ValueError, match="not a channel-block partition key"):
        parse_block_key("tiny-raw:0")


def test_provisioning_records_size_count_hash_and_skips_intact_copies(graph_run):
    data_root, instance, results = graph_run
    model = results[("models", "tiny")]
    assert model["file_count"] > 5 and model["size_bytes"] > 100_000 and len(model["content_hash"]) == 64
    again = _metadata(_materialize("models", "tiny", data_root, instance), "models")
    assert again["skipped_intact_copy"] is True and again["content_hash"] == model["content_hash"]
    prompts = results[("prompt_datasets", "tiny-prompts")]
    assert prompts["unique_prompts"] == 32 and prompts["invalid_lines"] == 0


def test_activations_metadata_and_lineage(graph_run):
    _, _, results = graph_run
    meta = results[("activations", "tiny")]
    assert meta["generations"] == 6 and meta["timesteps"] == 8
    assert meta["channels_per_variant"] == {"tiny-raw": 64, "tiny-sae": 256}
    assert meta["bytes_written"] > 0 and meta["seconds_per_image"] > 0
    assert "data:image/png;base64" in meta["preview"]
    assert set(meta["upstream_versions"]) == {"models/tiny", "saes/tiny-sae", "prompt_datasets/tiny-prompts"}
    assert meta["config"]["num_inference_steps"] == 8 and len(meta["config_hash"]) == 16


def test_statistics_tables_are_queryable_with_duckdb(graph_run):
    data_root, _, results = graph_run
    meta = results[("timestep_stats", "tiny-raw")]
    assert meta["channels"] == 64 and meta["generations"] == 6
    db = data_root / "outputs" / "default" / "timestep_stats" / "tiny-raw" / "stats.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    # every generation has exactly top_k channels at every timestep
    assert con.execute("select count(*) from topk").fetchone()[0] == 6 * 8 * 5
    freq = con.execute("select max(frequency), min(frequency) from frequency").fetchone()
    assert 0 < freq[1] <= freq[0] <= 1
    assert con.execute("select count(distinct channel) from max_activation").fetchone()[0] == 64
    for table in ("active_timesteps", "activity_peaks", "dataset_examples", "channels"):
        assert con.execute(f"select count(*) from {table}").fetchone()[0] > 0, table
    active = con.execute("select count(*) from channels where is_active").fetchone()[0]
    assert active == meta["active_channel_count"]
    con.close()


def test_activity_plots_are_written_for_active_channels(graph_run):
    data_root, _, results = graph_run
    meta = results[("activity_plots", "tiny-raw:0-15")]
    figures = list((data_root / "outputs" / "default" / "activity_plots" / "tiny-raw").glob("channel_*"))
    assert meta["figures"] == len(figures) > 0
    assert all(f.suffix in {".png", ".gif"} for f in figures)


def test_downstream_before_upstream_names_the_asset_to_materialize(tmp_path):
    result = _materialize("timestep_stats", "tiny-raw", tmp_path, dg.DagsterInstance.ephemeral())
    assert not result.success
    assert "materialize models[tiny], saes[tiny-sae], prompt_datasets[tiny-prompts], activations[tiny] first" in _error(result)


def test_bad_config_is_rejected_with_the_field_named(graph_run):
    data_root, instance, _ = graph_run
    result = _materialize("timestep_stats", "tiny-raw", data_root, instance, {"top_k": 999})
    assert not result.success and "top_k" in _error(result)


def test_priors_and_dreams_for_explicit_channels(graph_run):
    data_root, instance, results = graph_run
    priors = results[("priors", "tiny-raw:0-15")]
    assert priors["channels_done"] + priors["channels_skipped_inactive_or_unsteered"] == 3
    assert priors["images"] == 2 * priors["channels_done"]
    dreams = results[("dreams", "tiny-raw:0-15")]
    assert dreams["channels_done"] + dreams["channels_without_timesteps_or_prior"] == 3
    assert dreams["channels_done"] >= 1 and dreams["failed_dreams"] == 0
    out = data_root / "outputs" / "default" / "dreams" / "tiny-raw"
    assert sorted(p.parent.name for p in out.glob("channel_*/dream.json")) == [
        "channel_00000", "channel_00001", "channel_00002"]
    checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("dreams"), "dream_quality")])
    assert checks, "the dream_quality check ran with the materialization"


def test_explicit_channels_outside_the_block_are_refused(graph_run):
    data_root, instance, _ = graph_run
    result = _materialize("priors", "tiny-raw:0-15", data_root, instance, {"channels": [40]})
    assert not result.success and "not in the selected blocks" in _error(result)


def test_representation_index_and_html_export(graph_run):
    data_root, _, results = graph_run
    shards = results[("representation_shards", "tiny-raw:0-15")]
    assert shards["shards"] == 16 and shards["file_errors"] == 0
    # a channel counts with a raised dream only (ddr_core.dream_verdict): some dreamed channels have none
    assert 1 <= shards["with_dreams"] <= results[("dreams", "tiny-raw:0-15")]["channels_done"]
    index = data_root / "outputs" / "default" / "representation" / "tiny-raw" / "index.parquet"
    con = duckdb.connect()
    assert con.execute(f"select count(*) from read_parquet('{index}') where has_dreams").fetchone()[0] \
        == shards["with_dreams"]
    export = results[("html_export", "tiny-raw")]
    assert export["channel_pages"] > 0 and Path(export["index_html"]).is_file()


def test_cfg_contrast_reads_both_halves_and_shows_on_the_channel_page(graph_run):
    """The tiny capture records both CFG halves: every channel gets a verdict over the 6 prompts, and the HTML
    channel page shows both halves' chart and the contrast sentence."""
    data_root, _, results = graph_run
    found = results[("cfg_contrast", "tiny-raw")]
    assert found["halves"] == 2 and found["prompts"] == 6 and found["channels"] > 0
    table = pl.read_parquet(data_root / "outputs" / "default" / "cfg_contrast" / "tiny-raw" / "channels.parquet")
    assert table.height == found["channels"] and set(table["verdict"]) <= {"text-driven", "text-suppressed",
                                                                          "no evidence"}
    assert found["text_driven"] == int((table["verdict"] == "text-driven").sum())
    index = Path(results[("html_export", "tiny-raw")]["index_html"])
    page = next((index.parent / "channels").glob("*.html")).read_text()
    assert '<section id="cfg"><h2>Conditional vs unconditional</h2><p>Conditional vs unconditional (' in page
    assert "unconditional half (dashed)" in page


def test_variant_overrides_apply_unless_the_run_sets_the_field():
    from ddr_assets.configs import with_variant_overrides
    from ddr_assets.dreams import DreamsRunConfig
    from ddr_core.dreams import DreamConfig

    overrides = {"total_variation_weight": 0.0, "moment_penalty_weight": 0.5}
    merged = with_variant_overrides(DreamsRunConfig(), DreamConfig, overrides, asset="dreams")
    assert merged.total_variation_weight == 0.0 and merged.moment_penalty_weight == 0.5
    assert merged.timesteps == [0, "activity_peaks"]
    explicit = with_variant_overrides(DreamsRunConfig(total_variation_weight=0.2), DreamConfig, overrides,
                                      asset="dreams")
    assert explicit.total_variation_weight == 0.2
    with pytest.raises(dg.Failure, match="unknown dreams override"):
        with_variant_overrides(DreamsRunConfig(), DreamConfig, {"tv": 1}, asset="dreams")


def test_priors_take_the_variant_overrides_unless_the_run_sets_them():
    from ddr_assets.configs import with_variant_overrides
    from ddr_assets.priors import PriorsRunConfig
    from ddr_core.priors import PriorsConfig

    merged = with_variant_overrides(PriorsRunConfig(), PriorsConfig, {"steer_strength_scale": 15.0}, asset="priors")
    assert merged.steer_strength_scale == 15.0 and merged.resolved_scale("raw") == 15.0
    explicit = with_variant_overrides(PriorsRunConfig(steer_strength_scale=30.0), PriorsConfig,
                                      {"steer_strength_scale": 15.0}, asset="priors")
    assert explicit.steer_strength_scale == 30.0


_PROBE: dict[str, object] = {}


def _dreams_probe_asset() -> dg.AssetsDefinition:
    """An asset with the dreams run config that records which fields the run set and the merged config."""
    from ddr_assets.configs import fields_set_in_run_config, with_variant_overrides
    from ddr_assets.dreams import DreamsRunConfig
    from ddr_core.dreams import DreamConfig

    def dreams_probe(context, config) -> None:
        _PROBE["set"] = fields_set_in_run_config(context)
        _PROBE["merged"] = with_variant_overrides(config, DreamConfig, {"learning_rate": 0.02, "augmentation_level": 0},
                                                  asset="dreams", set_fields=_PROBE["set"])

    # real classes, not the strings `from __future__ import annotations` would leave for Dagster to resolve
    dreams_probe.__annotations__ = {"context": dg.AssetExecutionContext, "config": DreamsRunConfig, "return": None}
    return dg.asset(dreams_probe)


def test_a_run_value_equal_to_the_default_still_wins_over_the_variant_override():
    """``learning_rate: 0.05`` (the default) on a variant whose override is 0.02 runs with 0.05: Dagster fills
    unset fields with defaults, so which fields the user wrote comes from the run's own run config."""
    from ddr_core.dreams import DreamConfig

    default_rate = DreamConfig().learning_rate
    run_config = {"ops": {"dreams_probe": {"config": {"learning_rate": default_rate, "augmentation_level": 1}}}}
    probe = _dreams_probe_asset()
    assert dg.materialize([probe], run_config=run_config).success
    assert _PROBE["set"] == {"learning_rate", "augmentation_level"}
    assert _PROBE["merged"].learning_rate == default_rate and _PROBE["merged"].augmentation_level == 1
    assert dg.materialize([probe]).success  # nothing written: the overrides apply
    assert _PROBE["set"] == set()
    assert _PROBE["merged"].learning_rate == 0.02 and _PROBE["merged"].augmentation_level == 0


def test_every_variant_override_in_the_project_config_is_a_valid_stage_parameter():
    from ddr_core.config import load_project_config
    from ddr_core.dreams import DreamConfig
    from ddr_core.priors import PriorsConfig
    from ddr_core.statistics import TimestepStatsConfig

    stages = {"timestep_stats": TimestepStatsConfig, "priors": PriorsConfig, "dreams": DreamConfig}
    project = load_project_config()
    for name, variant in project.variants.items():
        for stage, values in variant.overrides.items():
            assert stage in stages, f"{name}: overrides for unknown stage {stage!r}"
            stages[stage](**values)  # raises on an unknown field or a bad value
    assert project.variants["toy-raw"].overrides["priors"]["steer_strength_scale"] < 50  # toy-world tuned


def test_channel_block_assets_come_from_one_factory_and_their_data_versions_match_the_records(graph_run):
    """priors, dreams, dreams_no_noise, representation_shards and activity_plots are built by
    ddr_assets.blocks.channel_block_asset; each returns one dg.DataVersion, the one its records carry, so
    Dagster's staleness view and the _records/ lineage agree."""
    from ddr_core.records import read_record
    from ddr_resources.resources import DdrStorage

    data_root, instance, _ = graph_run
    records_dir = DdrStorage(data_root=str(data_root)).layout.records_dir
    for name in ("activity_plots", "priors", "dreams", "representation_shards"):
        assert asset_def(name).op.compute_fn.decorated_fn.__module__ == "ddr_assets.blocks", name
        record = read_record(records_dir, name, "tiny-raw:0-15")
        event = instance.get_latest_materialization_event(dg.AssetKey(name))
        tags = event.asset_materialization.tags or {}
        assert tags.get("dagster/data_version") == record["data_version"], name
    export = read_record(records_dir, "html_export", "tiny-raw")
    event = instance.get_latest_materialization_event(dg.AssetKey("html_export"))
    assert (event.asset_materialization.tags or {}).get("dagster/data_version") == export["data_version"]
