"""Dagster run-config classes generated from the typed configs of :mod:`ddr_core`.

The compute layer owns each stage's parameters (a pydantic model with defaults, bounds and
descriptions). Dagster needs a ``dagster.Config`` subclass to show them in the launchpad; this builds
one with the same fields, so there is a single definition of every parameter. Validation of
cross-field rules happens when the asset converts it back with :func:`to_core`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import dagster as dg
from pydantic import BaseModel, Field, ValidationError, create_model

from ddr_core.performance import PerformanceConfig
from ddr_core.slurm_options import SlurmJobOptions

M = TypeVar("M", bound=BaseModel)


def dagster_config_from(model: type[BaseModel], name: str,
                        extra: dict[str, tuple[Any, Any]] | None = None) -> type[dg.Config]:
    """A ``dagster.Config`` with the fields of ``model`` (plus ``extra`` run-level fields)."""
    fields = {field_name: (info.annotation, info) for field_name, info in model.model_fields.items()}
    fields.update(extra or {})
    config_cls = create_model(name, __base__=dg.Config, __doc__=model.__doc__, **fields)
    config_cls.__module__ = __name__
    return config_cls


# The ``slurm:`` run-config section, generated from the one job-options model. Its field types carry the
# core model's validators (strict forms of names, times, sizes, mail settings; bounded counts), and Dagster
# builds the step's config with pydantic when the step starts: a bad value fails the step naming
# ``slurm.<field>`` before any job is built (tests/test_slurm_options.py).
SlurmRunConfig = dagster_config_from(SlurmJobOptions, "SlurmRunConfig")
SLURM_FIELD = (
    SlurmRunConfig | None,
    Field(None, description="SLURM job options of this run (compute mode slurm); unset fields keep the "
                            "deployment defaults (DDR_SLURM_*)"),
)

# The ``performance:`` run-config section of the GPU stages that run the denoiser region (activations, dreams):
# ddr_core.performance.PerformanceConfig (all off: the plain eager path). Its cross-field rules are checked by
# :func:`performance_args` when the step starts, before any job is submitted.
PerformanceRunConfig = dagster_config_from(PerformanceConfig, "PerformanceRunConfig")
PERFORMANCE_FIELD = (
    PerformanceRunConfig | None,
    Field(None, description="how the denoiser computes (channels_last, compile: blocks, attention kernel, fuse_qkv, "
                            "autocast; docs/GPU_EFFICIENCY.md); unset: the plain eager path"),
)


def performance_args(config: dg.Config, *, asset: str) -> dict[str, Any]:
    """``{"performance": {...}}`` for a stage's args when the run config sets ``performance`` (else ``{}``),
    validated as :class:`~ddr_core.performance.PerformanceConfig`; errors name the asset and the field."""
    section = getattr(config, "performance", None)
    if section is None:
        return {}
    performance = to_core(section, PerformanceConfig, asset=asset)
    return {} if performance.is_default else {"performance": performance.model_dump(mode="json",
                                                                                     exclude_defaults=True)}


def to_core(config: dg.Config, model: type[M], *, asset: str) -> M:
    """Validate a Dagster config as the core model; errors name the asset and the field."""
    try:
        return model.model_validate(config.model_dump(include=set(model.model_fields)))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise dg.Failure(description=f"invalid config for {asset}: {problems}") from None


def fields_set_in_run_config(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> set[str]:
    """The config fields this run's run config names for the running op (``ops.<op>.config``).

    Dagster fills every unset field with its default before building the op's ``Config``, so the
    ``Config`` object cannot tell ``learning_rate: 0.05`` written by the user from the default 0.05;
    the run's own run config can.
    """
    ops = (context.run.run_config or {}).get("ops") or {}
    entry = ops.get(context.op_def.name) or {}
    return set((entry.get("config") or {}) if isinstance(entry, dict) else {})


def with_variant_overrides(config: dg.Config, model: type[M], overrides: dict[str, Any], *, asset: str,
                           set_fields: set[str] | None = None) -> M:
    """The core config with the variant's overrides (``variants.<v>.overrides.<stage>`` in the project
    config) applied to every field the run did not set; what the run sets wins, also a value equal to
    the default.

    ``set_fields``: the fields the run config names (:func:`fields_set_in_run_config`); ``None`` takes the
    fields set when ``config`` was constructed (``model_fields_set``: code that builds a config directly).
    """
    unknown = sorted(set(overrides) - set(model.model_fields))
    if unknown:
        raise dg.Failure(description=f"unknown {asset} override(s) {unknown} in the project config; "
                                     f"known: {sorted(model.model_fields)}")
    given = to_core(config, model, asset=asset)
    chosen = config.model_fields_set if set_fields is None else set_fields
    merged = {name: (overrides[name] if name in overrides and name not in chosen else getattr(given, name))
              for name in model.model_fields}
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise dg.Failure(description=f"invalid config for {asset}: {problems}") from None
