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

activations_job = dg.define_asset_job(
    "capture_activations", selection=dg.AssetSelection.assets("activations"),
    description="Generate and record activations for one capture group (partition = capture group).")
timestep_stats_job = dg.define_asset_job(
    "compute_timestep_stats", selection=dg.AssetSelection.assets("timestep_stats"),
    description="Timestep statistics of one variant (partition = variant).")
channel_block_job = dg.define_asset_job(
    "visualise_channel_blocks",
    selection=dg.AssetSelection.assets("activity_plots", "priors", "dreams", "representation_shards"),
    description="Plots, priors, dreams and representation shards of channel blocks (partition = "
                "'<variant>:<first>-<last>'; a backfill over a range runs as one run per asset).")
ground_truth_job = dg.define_asset_job(
    "score_ground_truth", selection=dg.AssetSelection.assets("feature_concepts", "visual_benchmark"),
    description="Concept scores and the visualisation benchmark of one labelled variant (partition = variant).")

JOBS = [provision_models_job, provision_saes_job, provision_prompts_job, activations_job, timestep_stats_job,
        channel_block_job, ground_truth_job]
