"""Checks of a ``dagster`` CLI command that loads ddr's definitions, before Dagster runs anything.

:mod:`dagster_project.definitions` calls :func:`refuse_bad_cli_command` when it loads; it acts only in a
process started as ``dagster asset materialize`` / ``dagster job execute|launch|backfill`` (its ``sys.argv``),
and exits with status 2 and one short message:

* ``DAGSTER_HOME`` unset: Dagster would run on a temporary instance deleted when the command exits, so the
  run and its materializations would never show in the UI (``make dev`` uses ``<repo>/.dagster_home``);
* ``dagster asset materialize --partition KEY`` (or ``--partition-range FIRST...LAST``) with a key that some
  selected asset does not have: Dagster's own error is a 60-line traceback naming only the wrong key; this
  names the asset, the nearest valid keys and ``python -m dagster_project.partitions``. Likewise an unknown
  asset name in ``--select`` and a partitioned asset without ``--partition``.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# `dagster <group> <command>` that execute runs on the CLI's instance
RUN_COMMANDS = {("asset", "materialize"), ("job", "execute"), ("job", "launch"), ("job", "backfill")}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHOWN_KEYS = 8


def dagster_cli_command(argv: Sequence[str]) -> tuple[str, str] | None:
    """``(group, command)`` when ``argv`` is the ``dagster`` CLI's (``dagster ...`` or ``python -m dagster
    ...``), else None."""
    if not argv:
        return None
    program = Path(argv[0])
    is_dagster = program.name == "dagster" or (program.name == "__main__.py" and program.parent.name == "dagster")
    words = [word for word in argv[1:] if not word.startswith("-")]
    if not is_dagster or len(words) < 2:
        return None
    return words[0], words[1]


def _option(argv: Sequence[str], name: str) -> str | None:
    for index, word in enumerate(argv):
        if word == name and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(name + "="):
            return word[len(name) + 1:]
    return None


def missing_dagster_home(environ: Mapping[str, str]) -> str | None:
    """The message when ``DAGSTER_HOME`` is unset (None when it is set)."""
    if environ.get("DAGSTER_HOME"):
        return None
    home = PROJECT_ROOT / ".dagster_home"
    return ("DAGSTER_HOME is not set, so Dagster would run on a temporary instance that is deleted when this "
            "command exits: the run would never show in the UI. Use the project's instance (the one `make dev` "
            f"and `make demo` use): export DAGSTER_HOME={home}  (then run the command again)")


def nearest_keys(key: str, valid: Sequence[str], limit: int = SHOWN_KEYS) -> list[str]:
    """The keys of ``valid`` nearest ``key``: those of the same variant (the part before ``:``) when it has
    any, else the closest by spelling."""
    variant = key.split(":", 1)[0]
    same = [k for k in valid if k == variant or k.startswith(f"{variant}:")]
    if same:
        return same if len(same) <= limit else difflib.get_close_matches(key, same, n=limit, cutoff=0)
    return list(valid) if len(valid) <= limit else difflib.get_close_matches(key, valid, n=limit, cutoff=0)


def bad_partition(argv: Sequence[str], defs: Any) -> str | None:
    """The message for an unknown asset name in ``--select``, a partitioned asset without ``--partition``, or a
    ``--partition`` / ``--partition-range`` key that a selected asset lacks (None when all is well or the
    selection cannot be read here: Dagster reports that itself)."""
    import dagster as dg

    select = _option(argv, "--select")
    partition = _option(argv, "--partition")
    span = _option(argv, "--partition-range")
    if not select:
        return None
    keys = [partition] if partition else [k for k in (span or "").split("...") if k]
    graph = defs.resolve_asset_graph()
    names = sorted(key.to_user_string() for key in graph.get_all_asset_keys())
    unknown = [name for name in select.split(",") if name and "*" not in name and "+" not in name
               and ":" not in name and name not in names]
    if unknown:
        guesses = sorted({g for name in unknown for g in difflib.get_close_matches(name, names, n=2)})
        hint = f"did you mean {', '.join(guesses)}? " if guesses else ""
        return f"--select {select}: no asset named {', '.join(unknown)}; {hint}assets: {', '.join(names)}"
    try:
        selected = dg.AssetSelection.from_coercible(select.split(",")).resolve(graph)
    except Exception:  # noqa: BLE001 - a selection syntax Dagster reports itself
        return None
    for asset_key in sorted(selected, key=lambda k: k.to_user_string()):
        partitions = graph.get(asset_key).partitions_def
        if partitions is None:
            continue
        valid = list(partitions.get_partition_keys())
        if not keys:
            name = asset_key.to_user_string()
            return (f"{name} is partitioned ({len(valid)} keys): add --partition KEY, e.g. --partition {valid[0]}. "
                    f"List them: python -m dagster_project.partitions {name}")
        for key in keys:
            if key in valid:
                continue
            name = asset_key.to_user_string()
            near = nearest_keys(key, valid)
            variant = key.split(":", 1)[0]
            helper = f"python -m dagster_project.partitions {name}"
            if any(k == variant or k.startswith(f"{variant}:") for k in valid):
                helper += f" --variant {variant}"
            return (f"{key!r} is not a partition of {name} ({len(valid)} keys). Nearest valid keys: "
                    f"{', '.join(near)}. List them all: {helper}")
    return None


def cli_problem(argv: Sequence[str], environ: Mapping[str, str], defs: Any) -> str | None:
    """What is wrong with the ``dagster`` command ``argv`` loading ``defs`` (None: nothing, or not such a
    command)."""
    command = dagster_cli_command(argv)
    if command not in RUN_COMMANDS:
        return None
    if command == ("asset", "materialize"):
        problem = bad_partition(argv, defs)
        if problem:
            return problem
    return missing_dagster_home(environ)


def refuse_bad_cli_command(defs: Any, argv: Sequence[str] | None = None,
                           environ: Mapping[str, str] | None = None) -> None:
    """Exit with status 2 and one line on stderr when :func:`cli_problem` finds something."""
    problem = cli_problem(sys.argv if argv is None else argv, os.environ if environ is None else environ, defs)
    if problem:
        print(f"ddr: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)
