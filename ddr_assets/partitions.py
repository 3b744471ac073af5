"""Partitions of the asset graph, derived from the project configuration (``config/ddr.yaml``).

- provisioning assets are partitioned by the name of what they provision (model, SAE, prompt dataset);
- ``activations`` by capture group (variants sharing model, layer and prompts are captured together);
- per-variant stages by variant name.

``StaticPartitionMapping`` ties each partition to its upstream partitions, so lineage in the UI shows
exactly which model, SAE and prompt dataset a variant's results came from.
"""

from __future__ import annotations

from functools import cache

import dagster as dg

from ddr_core.config import ProjectConfig, load_project_config


@cache
def project() -> ProjectConfig:
    """The configuration the code location was loaded with, restricted to the active profile (``DDR_PROFILE``,
    else the config's ``profile``): its variants are the partitions (fixed at load time)."""
    return load_project_config().for_profile()


def model_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(project().models))


def sae_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(project().saes))


def prompt_dataset_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(project().prompt_datasets))


def capture_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(project().capture_groups()))


def variant_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(project().variants))


def capture_to_model_mapping() -> dg.StaticPartitionMapping:
    """upstream model -> capture groups using it."""
    cfg = project()
    mapping: dict[str, set[str]] = {}
    for group in cfg.capture_groups():
        model, _, _ = cfg.capture_spec(group)
        mapping.setdefault(model, set()).add(group)
    return dg.StaticPartitionMapping(mapping)


def capture_to_prompts_mapping() -> dg.StaticPartitionMapping:
    cfg = project()
    mapping: dict[str, set[str]] = {}
    for group in cfg.capture_groups():
        _, _, prompts = cfg.capture_spec(group)
        mapping.setdefault(prompts, set()).add(group)
    return dg.StaticPartitionMapping(mapping)


def capture_to_sae_mapping() -> dg.StaticPartitionMapping:
    cfg = project()
    mapping: dict[str, set[str]] = {}
    for group, variants in cfg.capture_groups().items():
        for variant in variants:
            sae = cfg.variants[variant].sae
            if sae:
                mapping.setdefault(sae, set()).add(group)
    return dg.StaticPartitionMapping(mapping)


def variant_to_capture_mapping() -> dg.StaticPartitionMapping:
    """upstream capture group -> the variants it records."""
    return dg.StaticPartitionMapping({group: set(variants)
                                      for group, variants in project().capture_groups().items()})


def block_key(variant: str, first: int, last: int) -> str:
    return f"{variant}:{first}-{last}"


def parse_block_key(key: str) -> tuple[str, int, int]:
    """``"<variant>:<first>-<last>"`` -> (variant, first, last); a clear error for anything else."""
    variant, sep, span = key.partition(":")
    first, dash, last = span.partition("-")
    if not (sep and dash and first.isdigit() and last.isdigit()) or variant not in project().variants:
        raise ValueError(f"{key!r} is not a channel-block partition key: expected '<variant>:<first>-<last>' "
                         f"with a configured variant, e.g. {block_keys()[:2]}")
    return variant, int(first), int(last)


def block_keys() -> list[str]:
    """Every valid ``<variant>:<first>-<last>`` block, variant by variant, channel ranges in order.

    One partition dimension holding only the blocks that exist: a ``MultiPartitionsDefinition``
    (variant x block) would create cells for channels a narrow variant does not have.
    """
    cfg = project()
    return [block_key(name, first, last)
            for name, variant in cfg.variants.items() for first, last in variant.channel_blocks()]


def channel_block_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(block_keys())


def block_to_variant_mapping() -> dg.StaticPartitionMapping:
    """upstream variant -> its channel blocks."""
    mapping: dict[str, set[str]] = {}
    for key in block_keys():
        mapping.setdefault(parse_block_key(key)[0], set()).add(key)
    return dg.StaticPartitionMapping(mapping)


def variant_to_blocks_mapping() -> dg.StaticPartitionMapping:
    """upstream channel block -> its variant (a per-variant asset reading every block)."""
    return dg.StaticPartitionMapping({key: parse_block_key(key)[0] for key in block_keys()})


def comparison_partitions() -> dg.StaticPartitionsDefinition:
    """One partition per configured comparison ``<variant A>__<variant B>`` of the active profile."""
    return dg.StaticPartitionsDefinition(list(project().comparisons))


def comparison_to_capture_mapping() -> dg.StaticPartitionMapping:
    """upstream capture group -> the comparisons reading it (both variants' capture groups)."""
    from ddr_core.comparisons import parse_comparison_name

    cfg = project()
    mapping: dict[str, set[str]] = {}
    for name in cfg.comparisons:
        for variant in parse_comparison_name(name):
            mapping.setdefault(cfg.capture_of(variant), set()).add(name)
    return dg.StaticPartitionMapping(mapping)
