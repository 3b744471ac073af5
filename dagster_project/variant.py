"""``python -m dagster_project.variant <variant>``: everything for one variant, through Dagster.

Dagster runs one ``dagster asset materialize`` over assets of **one** partitions definition; a variant's graph
spans several (model, SAE, prompt dataset, capture group, variant, channel block). This prints, or runs, the
variant's plan as that short sequence of ``dagster asset materialize`` commands (each a named Dagster run in
``DAGSTER_HOME``, shown in the UI): provisioning, the capture, the statistics, then plots, priors, dreams and
representation shards of every channel block in one single-run backfill, the ground-truth scores where the
variant has labelled prompts, and the HTML report::

    python -m dagster_project.variant tiny-raw            # the plan and its one command line (runs nothing)
    python -m dagster_project.variant tiny-raw --run      # run it: only what has no record yet
    python -m dagster_project.variant tiny-raw --run --all            # everything again
    python -m dagster_project.variant tiny-raw --run --blocks 1       # only the first channel block
    python -m dagster_project.variant tiny-raw --run --config config/runs/tiny-quick.yaml   # with a run config

    python -m dagster_project.variant tiny-raw --backfill # the same plan as ONE Dagster asset backfill

``--backfill`` submits the plan to the instance as one asset backfill with each asset's partitions (Dagster's own
way to materialize assets of several partitions definitions together: the daemon of ``make dev`` runs it in
dependency order, following the partition mappings; it shows under Runs -> Backfills, tagged ``ddr/variant``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ddr_core.config import ProjectConfig
from ddr_core.prerequisites import (
    Need,
    direct_requirements,
    is_materialized,
    materialize_commands,
    sort_needs,
)

BLOCK_STAGES = ("activity_plots", "priors", "dreams", "representation_shards")


def variant_plan(project: ProjectConfig, variant: str, blocks: int | None = None) -> list[Need]:
    """Every ``(asset, partition)`` of ``variant``'s graph, in run order (``blocks``: the first N channel blocks)."""
    if variant not in project.variants:
        raise SystemExit(f"unknown variant {variant!r}; configured: {', '.join(project.variants)} "
                         f"(python -m dagster_project.partitions timestep_stats)")
    spec = project.variants[variant]
    group = project.capture_of(variant)
    keys = [f"{variant}:{first}-{last}" for first, last in spec.channel_blocks()][:blocks]
    # the capture group records every variant of it at once: it needs the SAEs of all of them
    needs: list[Need] = [*direct_requirements(project, "activations", group), ("activations", group),
                         ("timestep_stats", variant)]
    needs += [(asset, key) for asset in BLOCK_STAGES for key in keys]
    if variant in project.labelled_variants():
        needs += [("feature_concepts", variant), ("visual_benchmark", variant)]
    if variant in project.labeller_variants():
        needs.append(("feature_labels", variant))
    needs.append(("html_export", variant))
    return sort_needs(project, needs)


def load_run_config(path: Path) -> dict[str, dict]:
    """``ops`` of a Dagster run config file (YAML or JSON: ``ops: {<asset>: {config: {...}}}``)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"--config {path}: cannot read it as YAML ({error})") from None
    ops = data.get("ops", {}) if isinstance(data, dict) else None
    if not isinstance(ops, dict) or set(data) - {"ops"}:
        raise SystemExit(f"--config {path}: expected a Dagster run config with only 'ops: {{<asset>: {{config: "
                         f"...}}}}', got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    return ops


def with_run_config(command: str, ops: dict[str, dict]) -> str:
    """``command`` with ``--config-json`` holding the ``ops`` of the assets it selects (Dagster refuses config
    for assets a run does not select)."""
    tokens = shlex.split(command)
    selected = tokens[tokens.index("--select") + 1].split(",")
    subset = {asset: ops[asset] for asset in selected if asset in ops}
    return shlex.join(tokens + ["--config-json", json.dumps({"ops": subset})]) if subset else command


def submit_backfill(instance, asset_graph, variant: str, needs: Sequence[Need], run_config: dict | None = None) -> str:
    """Submit ``needs`` as one asset backfill (each asset with its own partitions) to ``instance``; its id."""
    import dagster as dg
    from dagster._core.definitions.selector import (
        PartitionRangeSelector,
        PartitionsByAssetSelector,
        PartitionsSelector,
    )
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    by_asset: dict[str, list[str]] = {}
    for asset, key in needs:
        by_asset.setdefault(asset, []).append(key)
    selectors = [PartitionsByAssetSelector(asset_key=dg.AssetKey(asset), partitions=PartitionsSelector(
        ranges=[PartitionRangeSelector(start=key, end=key) for key in keys])) for asset, keys in by_asset.items()]
    backfill = PartitionBackfill.from_partitions_by_assets(
        backfill_id=make_new_backfill_id(), asset_graph=asset_graph, backfill_timestamp=time.time(),
        tags={"ddr/variant": variant}, dynamic_partitions_store=instance, partitions_by_assets=selectors,
        title=f"everything for {variant}", description=f"python -m dagster_project.variant {variant} --backfill",
        run_config=run_config)
    instance.add_backfill(backfill)
    return backfill.backfill_id


def main(argv: Sequence[str] | None = None) -> int:
    from ddr_assets.partitions import project
    from ddr_resources.resources import DdrStorage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", help="a configured variant, e.g. toy-raw")
    parser.add_argument("--run", action="store_true", help="run the commands (default: print them)")
    parser.add_argument("--backfill", action="store_true",
                        help="submit the plan as one asset backfill to DAGSTER_HOME's instance (the daemon runs it)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="a Dagster run config file (ops: {<asset>: {config: ...}}); each run gets its assets' part")
    parser.add_argument("--all", action="store_true",
                        help="every partition of the plan (default: those without a record)")
    parser.add_argument("--blocks", type=int, default=None, metavar="N",
                        help="only the first N channel blocks (default: every block)")
    args = parser.parse_args(argv)
    cfg = project()
    plan = variant_plan(cfg, args.variant, args.blocks)
    layout = DdrStorage().layout
    todo = plan if args.all else [need for need in plan if not is_materialized(layout, *need)]
    ops = load_run_config(args.config) if args.config else {}
    commands = [with_run_config(command, ops) for command in materialize_commands(cfg, todo)]
    print(f"{args.variant}: {len(plan)} partitions in its plan, {len(todo)} to materialize "
          f"(data root {layout.data_root}, experiment {layout.experiment})")
    if not commands:
        print("nothing to do: every partition of the plan has a record (--all to run them again)")
        return 0
    if args.backfill:
        import dagster as dg

        from dagster_project.definitions import defs

        with dg.DagsterInstance.get() as instance:  # DAGSTER_HOME: the daemon's instance
            backfill_id = submit_backfill(instance, defs.resolve_asset_graph(), args.variant, todo,
                                          run_config={"ops": ops} if ops else None)
        print(f"submitted asset backfill {backfill_id} ({len(todo)} partitions): the daemon (make dev) runs it; "
              f"the UI shows it under Runs -> Backfills")
        return 0
    if not args.run:
        print(" && ".join(commands))
        return 0
    for i, command in enumerate(commands, 1):
        print(f"[{i}/{len(commands)}] {command}", flush=True)
        code = subprocess.run(shlex.split(command), check=False).returncode
        if code:
            print(f"failed (exit {code}): {command}\nfix it and run this command again: it resumes with what "
                  f"has no record yet", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
