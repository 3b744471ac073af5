"""``python -m dagster_project.partitions``: the valid partition keys of the assets, for the command line.

Dagster's error for a wrong ``--partition`` names the bad key but not the good ones; this lists them, read
from the loaded definitions (so it is what ``dagster asset materialize`` accepts)::

    python -m dagster_project.partitions                      # every partitioned asset and its key count
    python -m dagster_project.partitions priors               # the keys of one asset
    python -m dagster_project.partitions priors --variant toy-raw
    python -m dagster_project.partitions priors --range       # first...last, for --partition-range
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import dagster as dg


def asset_partition_keys(defs: dg.Definitions | None = None) -> dict[str, list[str]]:
    """Asset name -> its partition keys, for every partitioned asset of the definitions."""
    if defs is None:
        from dagster_project.definitions import defs as loaded

        defs = loaded
    graph = defs.resolve_asset_graph()
    keys: dict[str, list[str]] = {}
    for asset_key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        partitions = graph.get(asset_key).partitions_def
        if partitions is not None:
            keys[asset_key.to_user_string()] = list(partitions.get_partition_keys())
    return keys


def _of_variant(keys: list[str], variant: str) -> list[str]:
    return [k for k in keys if k == variant or k.startswith(f"{variant}:")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dagster_project.partitions",
                                     description="List the valid partition keys of the ddr assets.")
    parser.add_argument("asset", nargs="?", help="an asset name (e.g. priors); none: every partitioned asset")
    parser.add_argument("--variant", help="only the keys of this variant (its channel blocks, or itself)")
    parser.add_argument("--range", action="store_true",
                        help="print first...last (the --partition-range of dagster asset materialize)")
    args = parser.parse_args(argv)
    keys = asset_partition_keys()
    if args.asset is None:
        for name, values in keys.items():
            shown = ", ".join(values[:3]) + (", ..." if len(values) > 3 else "")
            print(f"{name}: {len(values)} key(s): {shown}")
        return 0
    if args.asset not in keys:
        print(f"{args.asset!r} is not a partitioned asset; partitioned assets: {', '.join(keys)}", file=sys.stderr)
        return 2
    values = keys[args.asset]
    if args.variant is not None:
        values = _of_variant(values, args.variant)
        if not values:
            print(f"{args.asset} has no partition of variant {args.variant!r}; variants with keys: "
                  f"{', '.join(sorted({k.split(':')[0] for k in keys[args.asset]}))}", file=sys.stderr)
            return 2
    if args.range:
        print(f"{values[0]}...{values[-1]}")
    else:
        print("\n".join(values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
