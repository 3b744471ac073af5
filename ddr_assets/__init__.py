"""Dagster asset definitions of ddr: thin wrappers that call :mod:`ddr_core`."""

from ddr_assets.activations import activations
from ddr_assets.activity_plots import activity_plots
from ddr_assets.cfg_contrast import cfg_contrast
from ddr_assets.dose_response import dose_response
from ddr_assets.dreams import dreams, dreams_no_noise
from ddr_assets.feature_concepts import feature_concepts
from ddr_assets.feature_labels import feature_labels
from ddr_assets.feature_matches import feature_matches
from ddr_assets.heatmaps import heatmaps
from ddr_assets.priors import priors
from ddr_assets.provisioning import PROVISIONING_ASSETS
from ddr_assets.representation import html_export, representation_shards
from ddr_assets.sweeps import dream_sweeps
from ddr_assets.timestep_stats import timestep_stats
from ddr_assets.visual_benchmark import visual_benchmark

ALL_ASSETS = [*PROVISIONING_ASSETS, activations, timestep_stats, cfg_contrast, activity_plots, priors, dreams, dreams_no_noise,
              representation_shards, html_export, dream_sweeps, feature_concepts,
              visual_benchmark, heatmaps, dose_response, feature_labels, feature_matches]
