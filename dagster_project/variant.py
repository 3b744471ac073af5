"""``python -m dagster_project.variant <variant>``: everything for one variant, through Dagster.

Dagster runs one ``dagster asset materialize`` over assets of **one** partitions definition; a variant's graph
spans six (model, SAE, prompt dataset, capture group, variant, channel block). This prints, or runs, the
variant's plan as that short sequence of ``dagster asset materialize`` commands (each a named Dagster run in
``DAGSTER_HOME``, shown in the UI): provisioning, the capture, the statistics, then plots, priors, dreams and
representation shards of every channel block in one single-run backfill, the ground-truth scores where the
variant has labelled prompts, and the HTML report::

    python -m dagster_project.variant tiny-raw            # the plan and its one command line (runs nothing)
    python -m dagster_project.variant tiny-raw --run      # run it: only what has no record yet
    python -m dagster_project.variant tiny-raw --run --all            # everything again
    python -m dagster_project.variant tiny-raw --run --blocks 1       # only the first channel block

The same selection as one asset backfill (the daemon of ``make dev`` runs it, respecting the partition mappings):
the UI's Assets page, select the assets, Materialize, and pick the variant's partitions per asset.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence

from ddr_core.config import ProjectConfig
from ddr_core.prerequisites import Need, direct_requirements, is_materialized, materialize_commands, sort_needs

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
    needs.append(("html_export", variant))
    return sort_needs(project, needs)


def main(argv: Sequence[str] | None = None) -> int:
    from ddr_assets.partitions import project
    from ddr_resources.resources import DdrStorage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", help="a configured variant, e.g. toy-raw")
    parser.add_argument("--run", action="store_true", help="run the commands (default: print them)")
    parser.add_argument("--all", action="store_true",
                        help="every partition of the plan (default: those without a record)")
    parser.add_argument("--blocks", type=int, default=None, metavar="N",
                        help="only the first N channel blocks (default: every block)")
    args = parser.parse_args(argv)
    cfg = project()
    plan = variant_plan(cfg, args.variant, args.blocks)
    layout = DdrStorage().layout
    todo = plan if args.all else [need for need in plan if not is_materialized(layout, *need)]
    commands = materialize_commands(cfg, todo)
    print(f"{args.variant}: {len(plan)} partitions in its plan, {len(todo)} to materialize "
          f"(data root {layout.data_root}, experiment {layout.experiment})")
    if not commands:
        print("nothing to do: every partition of the plan has a record (--all to run them again)")
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
