"""Configured comparisons of two variants (``comparisons:`` in the project config; the ``feature_matches`` asset).

A comparison is named ``<variant A>__<variant B>`` (two declared variant names joined by ``__``): the name is the
partition key and the output folder, so it is checked in full at config load (:func:`parse_comparison_name`),
as are both variants and that they are captured on one prompt dataset (the same prompts and seeds are checked
again at run time against both captures: ``ddr_core.feature_matching_stage``).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ddr_core.paths import is_safe_name

SEPARATOR = "__"
COMPARISON_RULE = ("'<variant A>__<variant B>': two declared variant names joined by '__' (neither containing "
                   "'__'), lower-case letters, digits, '-', '_' or '.', e.g. 'toy-raw__toy-sae'")
_COMPARISON_RE = re.compile(r"([a-z0-9][a-z0-9_.-]*)__([a-z0-9][a-z0-9_.-]*)")


def parse_comparison_name(name: object) -> tuple[str, str]:
    """``"a__b"`` -> ``("a", "b")``.

    Raises:
        ValueError: a name that is not exactly two safe names joined by one ``__`` (naming the rule and the fix).
    """
    text = name if isinstance(name, str) else None
    match = _COMPARISON_RE.fullmatch(text) if text is not None else None
    if match is None or text is None or text.count(SEPARATOR) != 1 or "___" in text or not is_safe_name(text) \
            or not all(is_safe_name(part) for part in match.groups()):
        raise ValueError(f"comparison name {name!r} is not {COMPARISON_RULE}; rename it so (a variant whose name "
                         "contains '__' cannot be compared: rename the variant)")
    return match.group(1), match.group(2)


class ComparisonConfig(BaseModel):
    """One comparison of two variants (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    same_space: bool | None = Field(
        default=None, description="also match by direction similarity (decoder rows / channel unit vectors): both "
                                  "variants' units are directions in one space. Default: when both read the same "
                                  "layer and hook of the same model; set true for a finetune of the same "
                                  "architecture (e.g. SD v1.4 vs Style50), false to skip")
    matching: dict[str, Any] = Field(default_factory=dict,
                                     description="defaults of the matching settings (ddr_core.feature_matching."
                                                 "MatchingConfig) for this comparison; the run config still wins")

    @field_validator("matching")
    @classmethod
    def _known_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        from ddr_core.feature_matching import MatchingConfig

        MatchingConfig(**value)  # an unknown or out-of-range setting fails at config load
        return value


def check_comparisons(project: Any) -> None:
    """Each comparison's name, both variants, and that they share a prompt dataset (and, for ``same_space``, a
    layer and hook). Called by the project config's validation.

    Raises:
        ValueError: naming the comparison and the fix.
    """
    for name, comparison in project.comparisons.items():
        a, b = parse_comparison_name(name)
        for side in (a, b):
            if side not in project.variants:
                raise ValueError(f"comparisons.{name}: unknown variant {side!r}; declared: {sorted(project.variants)}")
        if a == b:
            raise ValueError(f"comparisons.{name}: compares {a!r} with itself; name two different variants")
        prompts_a, prompts_b = project.variants[a].prompts, project.variants[b].prompts
        if prompts_a != prompts_b:
            raise ValueError(f"comparisons.{name}: {a!r} is captured on prompt dataset {prompts_a!r} and {b!r} on "
                             f"{prompts_b!r}; matching needs the same prompts and seeds in both: point both variants "
                             "at one prompt dataset")
        if comparison.same_space and (project.layer_of(a), project.hook_of(a)) != (project.layer_of(b),
                                                                                    project.hook_of(b)):
            raise ValueError(f"comparisons.{name}: same_space needs one layer and hook, but {a!r} reads "
                             f"{project.layer_of(a)} ({project.hook_of(a)}) and {b!r} {project.layer_of(b)} "
                             f"({project.hook_of(b)}); drop same_space")


def same_space(project: Any, name: str) -> bool:
    """Whether comparison ``name`` also matches directions (its ``same_space``, or by default: one model, layer
    and hook)."""
    a, b = parse_comparison_name(name)
    configured = project.comparisons[name].same_space
    if configured is not None:
        return configured
    return (project.variants[a].model, project.layer_of(a), project.hook_of(a)) == (
        project.variants[b].model, project.layer_of(b), project.hook_of(b))
