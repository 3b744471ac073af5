"""``python -m dagster_project.variant``: everything for one variant through Dagster (issue 17 item 2).

Its ``--run`` on the tiny variant runs in tests/test_docs_commands.py (the README's block); here: the plan, the
printed commands and the asset backfill Dagster's daemon would run.
"""

from __future__ import annotations

import dagster as dg

from dagster_project.variant import main, submit_backfill, variant_plan
from ddr_core.config import load_project_config

TINY_BLOCKS = ["tiny-raw:0-15", "tiny-raw:16-31", "tiny-raw:32-47", "tiny-raw:48-63"]


def test_the_plan_of_a_variant_is_its_whole_graph_in_run_order():
    project = load_project_config()
    plan = variant_plan(project, "tiny-raw")
    # the capture group "tiny" records tiny-sae too, so its SAE is provisioned even for the raw variant
    assert plan[:5] == [("models", "tiny"), ("saes", "tiny-sae"), ("prompt_datasets", "tiny-prompts"),
                        ("activations", "tiny"), ("timestep_stats", "tiny-raw")]
    for stage in ("activity_plots", "priors", "dreams", "representation_shards"):
        assert [key for asset, key in plan if asset == stage] == TINY_BLOCKS
    assert plan[-1] == ("html_export", "tiny-raw")
    assert ("feature_concepts", "tiny-raw") not in plan  # no labelled prompts
    labelled = variant_plan(project, "toy-raw", blocks=1)
    assert ("feature_concepts", "toy-raw") in labelled and ("visual_benchmark", "toy-raw") in labelled
    assert [key for asset, key in labelled if asset == "priors"] == ["toy-raw:0-15"]


def test_the_printed_plan_is_one_command_per_partitions_definition(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDR_DATA_ROOT", str(tmp_path))
    assert main(["tiny-raw"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    commands = line.split(" && ")
    assert len(commands) == 7
    assert all(" asset materialize -m dagster_project.definitions --select " in c for c in commands)
    assert commands[5].endswith("--select activity_plots,priors,dreams,representation_shards "
                                "--partition-range tiny-raw:0-15...tiny-raw:48-63")
    assert not (tmp_path / "outputs").exists(), "printing the plan ran something"


def test_the_plan_as_one_asset_backfill_targets_exactly_its_partitions(tmp_path):
    from dagster_project.definitions import defs

    project = load_project_config()
    plan = variant_plan(project, "tiny-raw")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        backfill_id = submit_backfill(instance, defs.resolve_asset_graph(), "tiny-raw", plan)
        backfill = instance.get_backfill(backfill_id)
        assert backfill.tags["ddr/variant"] == "tiny-raw"
        target = backfill.asset_backfill_data.target_subset
        targeted = {(key.asset_key.to_user_string(), key.partition_key) for key in target.iterate_asset_partitions()}
    assert targeted == set(plan)
