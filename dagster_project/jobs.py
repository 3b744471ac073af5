"""Jobs: one per partitioned stage family (a job runs assets that share a partitions definition)."""

from __future__ import annotations

import dagster as dg

provision_models_job = dg.define_asset_job(
    "provision_models", selection=dg.AssetSelection.assets("models"),
    description="Provision one model (partition = model name).")
provision_saes_job = dg.define_asset_job(
    "provision_saes", selection=dg.AssetSelection.assets("saes"),
    description="Provision one SAE (partition = SAE name).")
provision_prompts_job = dg.define_asset_job(
    "provision_prompt_datasets", selection=dg.AssetSelection.assets("prompt_datasets"),
    description="Provision one prompt dataset (partition = dataset name).")

JOBS = [provision_models_job, provision_saes_job, provision_prompts_job]
