"""Dagster code location of ddr: ``defs`` lives in :mod:`dagster_project.definitions`."""
