"""Jobs: one per stage family (a job runs assets that share a partitions definition).

Each job is the name its runs carry in the run list (instead of ``__ASSET_JOB``) and tags them ``ddr/stage``;
the executor adds the partition's ``ddr/variant``, ``ddr/block``, ... (:mod:`dagster_project.run_tags`).
"""

from __future__ import annotations

import dagster as dg


def _job(name: str, assets: tuple[str, ...], description: str) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(name, selection=dg.AssetSelection.assets(*assets), description=description,
                               tags={"ddr/stage": ",".join(sorted(assets))})


provision_models_job = _job("provision_models", ("models",), "Provision one model (partition = model name).")
provision_saes_job = _job("provision_saes", ("saes",), "Provision one SAE (partition = SAE name).")
provision_prompts_job = _job("provision_prompt_datasets", ("prompt_datasets",),
                             "Provision one prompt dataset (partition = dataset name).")

activations_job = _job("capture_activations", ("activations",),
                       "Generate and record activations for one capture group (partition = capture group).")
timestep_stats_job = _job("compute_timestep_stats", ("timestep_stats", "cfg_contrast"),
                          "Timestep statistics and the CFG-half contrast of one variant (partition = variant).")
channel_block_job = _job(
    "visualise_channel_blocks", ("activity_plots", "priors", "dreams", "representation_shards"),
    "Plots, priors, dreams and representation shards of channel blocks (partition = "
    "'<variant>:<first>-<last>'; a backfill over a range runs as one run per asset).")
no_noise_dreams_job = _job("dream_without_noise", ("dreams_no_noise",),
                           "The no-noise ablation of the dreams of channel blocks (partition = "
                           "'<variant>:<first>-<last>').")
dream_sweeps_job = _job("sweep_dreams", ("dream_sweeps",), "The dream parameter sweeps (unpartitioned).")
ground_truth_job = _job("score_ground_truth", ("feature_concepts", "visual_benchmark"),
                        "Concept scores and the visualisation benchmark of one labelled variant (partition = variant).")
heatmaps_job = _job("map_heatmaps", ("heatmaps",), "Spatial heatmaps of channel blocks' top dataset examples "
                    "(partition = '<variant>:<first>-<last>').")
dose_response_job = _job("steering_dose_response", ("dose_response",),
                         "Steering dose-response x timestep windows of channel blocks (partition = "
                         "'<variant>:<first>-<last>'; run feature_concepts of a labelled variant first).")
feature_labels_job = _job("label_features", ("feature_labels",),
                          "Automatic labels of a variant's features with their detection scores (partition = variant "
                          "whose model names a labeller).")
feature_matches_job = _job("match_features", ("feature_matches",),
                           "Feature matching of two variants (partition = comparison '<variant A>__<variant B>').")
html_export_job = _job("export_html", ("html_export",), "The static HTML report of one variant (partition = variant).")

JOBS = [provision_models_job, provision_saes_job, provision_prompts_job, activations_job, timestep_stats_job,
        channel_block_job, no_noise_dreams_job, dream_sweeps_job, ground_truth_job, html_export_job, heatmaps_job,
        dose_response_job, feature_labels_job, feature_matches_job]


def job_of_asset(asset: str) -> str:
    """The name of the job that materializes ``asset`` (KeyError for an asset in no job)."""
    for job in JOBS:
        if asset in str((job.tags or {}).get("ddr/stage", "")).split(","):
            return job.name
    raise KeyError(asset)
