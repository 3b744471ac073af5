"""Channel-block runs: which variants and channels a (possibly multi-block) run covers."""

from collections.abc import Sequence

import dagster as dg
from pydantic import Field

from ddr_assets.partitions import parse_block_key

CHANNELS_FIELD = (
    list[int] | None,
    Field(None, description="explicit channels (a few chosen ones, for quick looks and sweeps); "
                            "they must lie in the selected channel blocks; default: every channel of them"),
)


def run_channels(partition_keys: Sequence[str], explicit: list[int] | None) -> dict[str, dict[str, list[int]]]:
    """variant -> {block key -> channels to process}, in partition order.

    Raises:
        dagster.Failure: an explicit channel lies outside every selected block.
    """
    plan: dict[str, dict[str, list[int]]] = {}
    wanted = set(explicit) if explicit is not None else None
    for key in partition_keys:
        variant, first, last = parse_block_key(key)
        channels = [c for c in range(first, last + 1) if wanted is None or c in wanted]
        if channels:
            plan.setdefault(variant, {})[key] = channels
    if wanted is not None:
        covered = {c for blocks in plan.values() for chans in blocks.values() for c in chans}
        outside = sorted(wanted - covered)
        if outside:
            raise dg.Failure(description=f"channels {outside} are not in the selected blocks "
                                         f"{list(partition_keys)}: select the blocks that contain them")
    return plan
