"""What an asset partition needs before it can run, what of that is missing, and one command that makes it.

The asset graph's *required* upstream (what a stage refuses to run without; optional inputs such as a shard's
dreams are left out) mirrors the ``deps`` the assets declare (tests/test_docs_commands.py checks that every
requirement here is a declared dependency). A partition counts as materialized when it has a valid record
(:mod:`ddr_core.records`): the completion report, whatever files exist.

:func:`check_prerequisites` names **every** missing upstream partition at once, transitively (a missing
``activations[tiny]`` brings its missing model, SAE and prompts), in dependency order, and one shell line of
``dagster asset materialize`` commands (joined by ``&&``) that materializes them when pasted in the project
root: assets that share a partitions definition and keys run in one command; provisioning assets each have their
own partitions definition, so one ``dagster asset materialize`` cannot take them all.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from ddr_core.config import ProjectConfig
from ddr_core.paths import DataLayout
from ddr_core.records import MissingUpstreamError, read_record

Need = tuple[str, str]
"""``(asset, partition key)``."""

PROVISIONING_ASSETS = ("models", "saes", "prompt_datasets")
BLOCK_ASSETS = ("activity_plots", "priors", "dreams", "dreams_no_noise", "representation_shards", "heatmaps",
                "dose_response")
# The order a plan runs in (every asset after all it may read).
STAGE_ORDER = ("models", "saes", "prompt_datasets", "activations", "timestep_stats", "cfg_contrast", "activity_plots",
               "priors", "dreams", "dreams_no_noise", "heatmaps", "representation_shards", "feature_concepts",
               "visual_benchmark", "feature_labels", "dose_response", "html_export", "feature_matches")
# Which partitions definition an asset has: assets of one kind can share a `dagster asset materialize`.
PARTITION_KIND = {"models": "model", "saes": "sae", "prompt_datasets": "prompt_dataset", "activations": "capture",
                  "timestep_stats": "variant", "cfg_contrast": "variant", "html_export": "variant", "feature_concepts": "labelled_variant",
                  "visual_benchmark": "labelled_variant", "feature_labels": "labeller_variant",
                  "feature_matches": "comparison", **{a: "block" for a in BLOCK_ASSETS}}
DEFINITIONS_MODULE = "dagster_project.definitions"


def block_variant(key: str) -> str:
    """The variant of a ``<variant>:<first>-<last>`` key (the key itself for a variant key)."""
    return key.partition(":")[0]


def direct_requirements(project: ProjectConfig, asset: str, key: str, *, use_prior: bool = True) -> list[Need]:
    """The upstream partitions ``asset[key]`` cannot run without (``use_prior``: dreams start from priors)."""
    if asset == "activations":
        model, _, prompts = project.capture_spec(key)
        saes = [project.variants[v].sae for v in project.capture_groups()[key] if project.variants[v].sae]
        return [("models", model), *[("saes", s) for s in dict.fromkeys(saes)], ("prompt_datasets", prompts)]
    if asset in ("timestep_stats", "cfg_contrast"):
        return [("activations", project.capture_of(key))]
    if asset in ("activity_plots", "priors", "representation_shards", "html_export", "feature_concepts", "heatmaps",
                 "dose_response", "feature_labels"):
        return [("timestep_stats", block_variant(key))]
    if asset in ("dreams", "dreams_no_noise"):
        return [("timestep_stats", block_variant(key))] + ([("priors", key)] if use_prior else [])
    if asset == "visual_benchmark":
        return [("feature_concepts", key)]
    if asset == "feature_matches":  # both variants' captures (one when they share a capture group)
        from ddr_core.comparisons import parse_comparison_name

        return [("activations", g) for g in dict.fromkeys(project.capture_of(v) for v in parse_comparison_name(key))]
    return []


def is_materialized(layout: DataLayout, asset: str, key: str) -> bool:
    """Whether ``asset[key]`` has a valid record (a completion report)."""
    records = layout.provisioning_records_dir if asset in PROVISIONING_ASSETS else layout.records_dir
    try:
        read_record(records, asset, key)
    except MissingUpstreamError:
        return False
    return True


def missing_prerequisites(project: ProjectConfig, layout: DataLayout, asset: str, keys: Iterable[str], *,
                          use_prior: bool = True) -> list[Need]:
    """Every upstream partition ``asset[keys]`` needs that has no record, with the missing ones *they* need,
    in dependency order (what is materialized stops the walk)."""
    missing: list[Need] = []
    seen: set[Need] = set()

    def visit(need: Need, prior: bool) -> None:
        for upstream in direct_requirements(project, *need, use_prior=prior):
            if upstream in seen:
                continue
            seen.add(upstream)
            if not is_materialized(layout, *upstream):
                visit(upstream, True)
                missing.append(upstream)

    for key in keys:
        visit((asset, key), use_prior)
    return sort_needs(project, missing)


def sort_needs(project: ProjectConfig, needs: Iterable[Need]) -> list[Need]:
    """``needs`` in run order: by stage, then partitions in their definition's order."""
    order = {key: i for i, key in enumerate(_block_keys(project))}
    return sorted(dict.fromkeys(needs), key=lambda n: (STAGE_ORDER.index(n[0]) if n[0] in STAGE_ORDER else 99,
                                                       order.get(n[1], -1), n[1]))


def _block_keys(project: ProjectConfig) -> list[str]:
    return [f"{name}:{first}-{last}" for name, v in project.variants.items() for first, last in v.channel_blocks()]


def dagster_executable() -> str:
    """How to call the ``dagster`` CLI of this environment from the current folder: ``.venv/bin/dagster``
    when the environment lies below it, else its absolute path, else ``dagster``."""
    candidate = Path(sys.prefix) / "bin" / "dagster"
    if not candidate.exists():
        return "dagster"
    try:
        relative = candidate.absolute().relative_to(Path.cwd())
    except ValueError:
        return str(candidate.absolute())
    return str(relative)


def materialize_commands(project: ProjectConfig, needs: Sequence[Need], *, dagster: str | None = None) -> list[str]:
    """``dagster asset materialize`` commands that make ``needs``, in run order: assets of one partitions
    definition with the same keys share a command; consecutive channel blocks become a ``--partition-range``."""
    dagster = dagster or dagster_executable()
    by_asset: dict[str, list[str]] = {}
    for asset, key in sort_needs(project, needs):
        by_asset.setdefault(asset, []).append(key)
    groups: list[tuple[list[str], list[str]]] = []  # (assets, keys)
    for asset, keys in by_asset.items():
        last = groups[-1] if groups else None
        if last and last[1] == keys and PARTITION_KIND.get(last[0][-1]) == PARTITION_KIND.get(asset):
            last[0].append(asset)
        else:
            groups.append(([asset], keys))
    blocks = _block_keys(project)
    commands: list[str] = []
    for assets, keys in groups:
        base = [dagster, "asset", "materialize", "-m", DEFINITIONS_MODULE, "--select", ",".join(assets)]
        for run in _runs(keys, blocks) if PARTITION_KIND.get(assets[0]) == "block" else [[k] for k in keys]:
            option = ["--partition", run[0]] if len(run) == 1 else ["--partition-range", f"{run[0]}...{run[-1]}"]
            commands.append(shlex.join(base + option))
    return commands


def _runs(keys: list[str], order: list[str]) -> list[list[str]]:
    """``keys`` split into runs that are consecutive in ``order`` and of one variant."""
    runs: list[list[str]] = []
    for key in keys:
        if (runs and block_variant(runs[-1][-1]) == block_variant(key) and key in order and runs[-1][-1] in order
                and order.index(key) == order.index(runs[-1][-1]) + 1):
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs


def one_command(project: ProjectConfig, needs: Sequence[Need], *, dagster: str | None = None) -> str:
    """The commands of :func:`materialize_commands` as one shell line (``&&``: each starts once the one before
    it succeeded); ``DAGSTER_HOME`` is exported first when it is set, so the runs land in the same instance."""
    commands = materialize_commands(project, needs, dagster=dagster)
    home = os.environ.get("DAGSTER_HOME")
    prefix = [f"export DAGSTER_HOME={shlex.quote(home)}"] if home else []
    return " && ".join(prefix + commands)


def format_needs(needs: Sequence[Need]) -> str:
    return ", ".join(f"{asset}[{key}]" for asset, key in needs)


def check_prerequisites(project: ProjectConfig, layout: DataLayout, asset: str, keys: Sequence[str], *,
                        use_prior: bool = True) -> None:
    """Raise :class:`MissingUpstreamError` naming every missing upstream partition of ``asset[keys]`` and one
    command that materializes them all; nothing when all are there."""
    missing = missing_prerequisites(project, layout, asset, keys, use_prior=use_prior)
    if not missing:
        return
    target = f"{asset}[{keys[0]}]" if len(keys) == 1 else f"{asset}[{keys[0]}...{keys[-1]}]"
    raise MissingUpstreamError(
        f"{target} needs {len(missing)} upstream partition(s) that are not materialized yet: "
        f"materialize {format_needs(missing)} first. One command for all of them (paste it in the project "
        f"root; it runs them in this order):\n  {one_command(project, missing)}"
    )
