"""A missing upstream names every missing upstream partition at once and one command that makes them (issue 17)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from ddr_core.config import load_project_config
from ddr_core.paths import DataLayout
from ddr_core.prerequisites import (
    PARTITION_KIND,
    check_prerequisites,
    direct_requirements,
    materialize_commands,
    missing_prerequisites,
)
from ddr_core.records import MissingUpstreamError, make_record, write_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project():
    return load_project_config()


def _layout(project, tmp_path: Path) -> DataLayout:
    return DataLayout(data_root=tmp_path, experiment=project.experiment)


def _record(layout: DataLayout, asset: str, key: str) -> None:
    provisioning = asset in ("models", "saes", "prompt_datasets")
    write_record(layout.provisioning_records_dir if provisioning else layout.records_dir,
                 make_record(asset, key, "1", {}, {}, f"v-{asset}-{key}"))


def test_every_missing_upstream_is_named_at_once_with_one_pasteable_command(project, tmp_path):
    layout = _layout(project, tmp_path)
    _record(layout, "models", "tiny")
    with pytest.raises(MissingUpstreamError) as error:
        check_prerequisites(project, layout, "activations", ["tiny"])
    message = str(error.value)
    assert "materialize saes[tiny-sae], prompt_datasets[tiny-prompts] first" in message
    command = message.splitlines()[-1].strip()
    assert command.count("dagster asset materialize -m dagster_project.definitions") == 2
    assert "--select saes --partition tiny-sae" in command and "--select prompt_datasets --partition tiny-prompts" \
        in command


def test_missing_upstream_is_transitive_and_in_run_order(project, tmp_path):
    layout = _layout(project, tmp_path)
    assert missing_prerequisites(project, layout, "timestep_stats", ["tiny-raw"]) == [
        ("models", "tiny"), ("saes", "tiny-sae"), ("prompt_datasets", "tiny-prompts"), ("activations", "tiny")]
    _record(layout, "activations", "tiny")  # a present upstream stops the walk
    assert missing_prerequisites(project, layout, "timestep_stats", ["tiny-raw"]) == []
    assert missing_prerequisites(project, layout, "dreams", ["tiny-raw:0-15", "tiny-raw:16-31"]) == [
        ("timestep_stats", "tiny-raw"), ("priors", "tiny-raw:0-15"), ("priors", "tiny-raw:16-31")]
    assert missing_prerequisites(project, layout, "dreams", ["tiny-raw:0-15"], use_prior=False) == [
        ("timestep_stats", "tiny-raw")]


def test_commands_share_a_run_per_partitions_definition_and_use_ranges(project):
    needs = [("timestep_stats", "tiny-raw"), ("priors", "tiny-raw:0-15"), ("priors", "tiny-raw:16-31"),
             ("dreams", "tiny-raw:0-15"), ("dreams", "tiny-raw:16-31"), ("priors", "tiny-raw:48-63")]
    commands = materialize_commands(project, needs, dagster="dagster")
    assert commands == [
        "dagster asset materialize -m dagster_project.definitions --select timestep_stats --partition tiny-raw",
        "dagster asset materialize -m dagster_project.definitions --select priors "
        "--partition-range tiny-raw:0-15...tiny-raw:16-31",
        "dagster asset materialize -m dagster_project.definitions --select priors --partition tiny-raw:48-63",
        "dagster asset materialize -m dagster_project.definitions --select dreams "
        "--partition-range tiny-raw:0-15...tiny-raw:16-31",
    ]


def test_requirements_are_declared_dependencies_with_their_partition_mappings(project):
    """The requirements here mirror the assets' ``deps`` and partition mappings (so they cannot drift)."""
    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()

    def ancestors(key: dg.AssetKey) -> set[dg.AssetKey]:
        parents = set(graph.get(key).parent_keys)
        return parents.union(*(ancestors(parent) for parent in parents))

    checked = 0
    for asset in PARTITION_KIND:
        node = graph.get(dg.AssetKey(asset))
        for key in node.partitions_def.get_partition_keys():
            for upstream, upstream_key in direct_requirements(project, asset, key):
                if dg.AssetKey(upstream) not in node.parent_keys:  # e.g. html_export reads it via the shards
                    assert dg.AssetKey(upstream) in ancestors(dg.AssetKey(asset)), f"{asset} has no {upstream} upstream"
                    continue
                mapped = graph.get_parent_partition_keys_for_child(key, dg.AssetKey(upstream), dg.AssetKey(asset))
                assert upstream_key in mapped.partitions_subset.get_partition_keys(), (asset, key, upstream)
                checked += 1
    assert checked > 100


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "dagster").exists(), reason="needs `make setup` (.venv)")
def test_the_command_of_the_error_works_when_pasted(tmp_path, monkeypatch):
    """Through Dagster: activations before its SAE and prompts fails naming both; the printed line, pasted into
    a shell in the project root, materializes them, and activations then finds nothing missing."""
    from tests.tiny_graph import materialize as _materialize
    from tests.tiny_graph import step_error as _error

    data_root = tmp_path / "data"
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    project = load_project_config()
    layout = _layout(project, data_root)
    _record(layout, "models", "tiny")  # the README's first command ran
    result = _materialize("activations", "tiny", data_root, dg.DagsterInstance.ephemeral())
    error = _error(result)
    assert not result.success and "saes[tiny-sae], prompt_datasets[tiny-prompts]" in error
    line = next(ln.strip() for ln in error.splitlines() if "&& " in ln and "dagster asset materialize" in ln)
    assert re.search(r"\.venv/bin/dagster asset materialize -m dagster_project\.definitions", line)
    env = {**os.environ, "DDR_DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    pasted = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert pasted.returncode == 0, pasted.stderr[-3000:]
    assert missing_prerequisites(project, layout, "activations", ["tiny"]) == []
    with dg.DagsterInstance.from_config(str(home)) as instance:  # the pasted runs landed in DAGSTER_HOME
        assert instance.get_runs_count() == 2
