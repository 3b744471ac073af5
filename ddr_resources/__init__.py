"""Dagster resources of ddr and what they run on: where data lives (:mod:`ddr_resources.resources`), how a
GPU stage runs locally or as a SLURM job (:mod:`ddr_resources.slurm`) and the guard of in-process runs
(:mod:`ddr_resources.run_guard`).

Layering: :mod:`ddr_core` (no Dagster) < ``ddr_resources`` < :mod:`ddr_assets` < :mod:`dagster_project`
(Definitions, jobs, the executor, the launcher). Nothing here imports ``ddr_assets`` or ``dagster_project``
(tests/test_layering.py), so the instance can load the run launcher without the asset graph.
"""
