"""Run tags that tell ddr's runs apart in the Dagster UI's run list (filter by tag, e.g. ``ddr/variant=toy-raw``).

=====================  ==========================================================================================
``ddr/stage``          the asset(s) the run materializes, e.g. ``priors`` (several: ``activity_plots,priors``)
``ddr/variant``        the variant of a per-variant or channel-block partition (``toy-raw``)
``ddr/block``          the channel range of a channel-block partition (``0-15``; a partition range: ``0-15...48-63``)
``ddr/capture``        the capture group of an ``activations`` partition (``toy-world``)
``ddr/comparison``     the comparison of a ``feature_matches`` partition (``toy-raw__toy-sae``)
``ddr/model`` ...      the model / SAE / prompt dataset a provisioning run fetches
``ddr/experiment``     the experiment the run writes to (run config ``resources.storage``, else ``DDR_EXPERIMENT``,
                       else the config's ``experiment``)
=====================  ==========================================================================================

Every run executed through the definitions (UI, CLI, schedules, automation, backfills) gets them from ddr's
executor (:mod:`dagster_project.worker_guard`) when it starts; the named jobs carry ``ddr/stage`` as a default
tag; ``make demo`` passes them itself (its runs execute in process).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

TAG_PREFIX = "ddr/"
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# provisioning assets: the tag naming what they provision
PROVISION_TAGS = {"models": "ddr/model", "saes": "ddr/sae", "prompt_datasets": "ddr/prompts"}
VARIANT_ASSETS = {"timestep_stats", "cfg_contrast", "html_export", "feature_concepts", "visual_benchmark",
                  "feature_labels"}


def _split_block(key: str) -> tuple[str, str] | None:
    """``"<variant>:<first>-<last>"`` -> (variant, "<first>-<last>"), None for any other key."""
    variant, sep, span = key.partition(":")
    first, dash, last = span.partition("-")
    if sep and dash and first.isdigit() and last.isdigit():
        return variant, span
    return None


def _experiment(run_config: Mapping[str, Any] | None) -> str | None:
    storage = ((run_config or {}).get("resources") or {}).get("storage") or {}
    configured = (storage.get("config") or {}).get("experiment") if isinstance(storage, Mapping) else None
    if isinstance(configured, str) and configured:
        return configured
    if os.environ.get("DDR_EXPERIMENT"):
        return os.environ["DDR_EXPERIMENT"]
    try:
        from ddr_assets.partitions import project

        return project().experiment
    except Exception:  # a tag is never worth failing a run for
        return None


def ddr_run_tags(assets: Iterable[str], partition_key: str | None = None, *,
                 partition_range: tuple[str, str] | None = None, experiment: str | None = None,
                 run_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``ddr/*`` tags of a run materializing ``assets`` (asset names) at ``partition_key`` (or over
    ``partition_range``, first and last key). ``experiment`` unset: from ``run_config``/the environment."""
    names = sorted(set(assets))
    tags: dict[str, str] = {}
    if names:
        tags["ddr/stage"] = ",".join(names)
    first, last = partition_range if partition_range else (partition_key, partition_key)
    if first is not None and last is not None:
        start, end = _split_block(first), _split_block(last)
        if start is not None and end is not None:
            tags["ddr/variant"] = start[0] if start[0] == end[0] else f"{start[0]}...{end[0]}"
            tags["ddr/block"] = start[1] if first == last else f"{start[1]}...{end[1]}"
        elif first == last:
            if "activations" in names:
                tags["ddr/capture"] = first
            elif len(names) == 1 and names[0] in PROVISION_TAGS:
                tags[PROVISION_TAGS[names[0]]] = first
            elif VARIANT_ASSETS.intersection(names):
                tags["ddr/variant"] = first
            elif names == ["feature_matches"]:
                tags["ddr/comparison"] = first
    experiment = experiment or _experiment(run_config)
    if experiment:
        tags["ddr/experiment"] = experiment
    return tags


def tags_for_run(run: Any, step_keys: Iterable[str] = ()) -> dict[str, str]:
    """The ``ddr/*`` tags of a :class:`dagster.DagsterRun` (its asset selection, else the ``step_keys`` it
    executes; its partition or partition-range tags; its run config)."""
    if run.asset_selection:
        assets = [key.path[-1] for key in run.asset_selection]
    else:
        assets = [key.split("[")[0] for key in step_keys]
    run_tags = run.tags or {}
    partition_range = None
    if run_tags.get(RANGE_START_TAG) and run_tags.get(RANGE_END_TAG):
        partition_range = (run_tags[RANGE_START_TAG], run_tags[RANGE_END_TAG])
    return ddr_run_tags(assets, run_tags.get(PARTITION_TAG), partition_range=partition_range,
                        run_config=run.run_config)


def tag_run(instance: Any, run: Any, step_keys: Iterable[str] = ()) -> dict[str, str]:
    """Add the ``ddr/*`` tags :func:`tags_for_run` computes that ``run`` lacks or has otherwise; returns
    them. Never raises: a tag is not worth failing a run for."""
    try:
        wanted = tags_for_run(run, step_keys)
        current = run.tags or {}
        changed = {key: value for key, value in wanted.items() if current.get(key) != value}
        if changed:
            instance.add_run_tags(run.run_id, changed)
        return wanted
    except Exception:  # noqa: BLE001
        return {}
