"""``make demo``: materialize the main graph on the embedded default variants.

Runs every stage, partition by partition, in one persistent Dagster instance (``DAGSTER_HOME``), so
that ``dagster dev`` afterwards shows the materializations, their metadata and lineage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import dagster as dg

from dagster_project.resources import ComputeResource, DdrStorage
from ddr_assets.partitions import block_key, project

# Run config of the demo: a fixed seed so two demos give the same pictures.
DEMO_RUN_CONFIG: dict[str, dict] = {
    "activations": {"seed": 0, "batch_size": 8},
}


def demo_plan(variants: list[str]) -> list[tuple[str, list[str]]]:
    """(asset name, partition keys) in dependency order for the given variants."""
    cfg = project()
    models = sorted({cfg.variants[v].model for v in variants})
    saes = sorted({cfg.variants[v].sae for v in variants if cfg.variants[v].sae})
    prompts = sorted({cfg.variants[v].prompts for v in variants})
    captures = list(dict.fromkeys(cfg.capture_of(v) for v in variants))
    blocks = [block_key(v, first, last) for v in variants for first, last in cfg.variants[v].channel_blocks()]
    return [
        ("models", models),
        ("saes", saes),
        ("prompt_datasets", prompts),
        ("activations", captures),
        ("timestep_stats", list(variants)),
        ("activity_plots", blocks),
    ]


def _asset_by_name(name: str) -> dg.AssetsDefinition:
    from ddr_assets import ALL_ASSETS

    for asset in ALL_ASSETS:
        if asset.key == dg.AssetKey(name):
            return asset
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="*", default=None,
                        help="variants to run (default: the config's default_variants)")
    args = parser.parse_args(argv)
    variants = args.variants or project().default_variants
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    storage = DdrStorage()
    print(f"ddr demo: variants {variants}; data root {storage.layout.data_root}; "
          f"experiment {storage.layout.experiment}")
    start = time.monotonic()
    for asset_name, keys in demo_plan(variants):
        for key in keys:
            t0 = time.monotonic()
            run_config = {"ops": {asset_name: {"config": DEMO_RUN_CONFIG[asset_name]}}} \
                if asset_name in DEMO_RUN_CONFIG else None
            result = dg.materialize([_asset_by_name(asset_name)], partition_key=key, instance=instance,
                                    resources={"storage": storage, "compute": ComputeResource()},
                                    run_config=run_config, raise_on_error=False)
            status = "ok" if result.success else "FAILED"
            print(f"  {asset_name}[{key}]: {status} in {time.monotonic() - t0:.1f}s")
            if not result.success:
                for event in result.all_events:
                    if event.is_failure and event.event_specific_data is not None:
                        print(getattr(event.event_specific_data, "error", event.message), file=sys.stderr)
                return 1
    print(f"ddr demo finished in {time.monotonic() - start:.0f}s. Data under {storage.layout.data_root}.")
    print(f"Browse it: DAGSTER_HOME={Path(os.environ.get('DAGSTER_HOME', '.dagster_home')).resolve()} "
          f".venv/bin/dagster dev   (then open http://127.0.0.1:3000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
