"""The tiny model's whole asset graph, materialized once per test session (shared by several tests)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from ddr_assets import ALL_ASSETS
from ddr_resources.resources import ComputeResource, DdrStorage


def asset_def(name: str) -> dg.AssetsDefinition:
    return next(a for a in ALL_ASSETS if a.key == dg.AssetKey(name))


def materialize(name: str, key: str, data_root: Path, instance: dg.DagsterInstance, config: dict | None = None):
    return dg.materialize(
        [asset_def(name)], partition_key=key, instance=instance,
        resources={"storage": DdrStorage(data_root=str(data_root)), "compute": ComputeResource(device="cpu")},
        run_config={"ops": {name: {"config": config}}} if config else None, raise_on_error=False,
    )


def metadata(result: dg.ExecuteInProcessResult, name: str) -> dict:
    event = result.get_asset_materialization_events()[0]
    assert event.asset_key == dg.AssetKey(name)
    return {k: v.value for k, v in event.materialization.metadata.items()}


def step_error(result: dg.ExecuteInProcessResult) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return str(failure.event_specific_data.error)


def build_tiny_graph(data_root: Path, instance: dg.DagsterInstance):
    """Provisioning -> activations -> stats -> plots -> priors -> dreams -> shards -> export (tiny settings)."""
    results = {}
    for name, key, config in [
        ("models", "tiny", None),
        ("saes", "tiny-sae", None),
        ("prompt_datasets", "tiny-prompts", None),
        ("activations", "tiny", {"n_prompts": 6, "batch_size": 4, "num_inference_steps": 8, "seed": 1}),
        ("timestep_stats", "tiny-raw", {"top_k": 5, "peak_separation": 50}),
        ("timestep_stats", "tiny-sae", {"top_k": 10}),
        ("cfg_contrast", "tiny-raw", None),
        ("activity_plots", "tiny-raw:0-15", None),
        ("priors", "tiny-raw:0-15", {"channels": [0, 1, 2], "n_results": 2, "seeds": [11, 12],
                                     "num_inference_steps": 8}),
        ("dreams", "tiny-raw:0-15", {"channels": [0, 1, 2], "n_results": 2, "num_steps": 4, "learning_rate": 1.0,
                                     "timesteps": ["0", "activity_peaks"], "snapshot_every": 2}),
        ("representation_shards", "tiny-raw:0-15", None),
        ("html_export", "tiny-raw", None),
    ]:
        result = materialize(name, key, data_root, instance, config)
        assert result.success, step_error(result)
        results[(name, key)] = metadata(result, name)
    return data_root, instance, results


