"""Parameters of the feature-concepts scores (:class:`FeatureConceptsConfig`) and the names of its outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ddr_core.config import config_hash

LogFn = Callable[[str], None]
FORMAT = "ddr.feature_concepts/1"
TABLE_FILE = "feature_concepts.parquet"
SUMMARY_FILE = "summary.json"
SOURCES: tuple[str, ...] = ("prior", "dream")
QUANTILES: dict[str, float] = {"q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9}


class FeatureConceptsConfig(BaseModel):
    """Parameters of :func:`compute_feature_concepts`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    examples: Literal["peak_all_generations", "top_peak", "all_timesteps"] = Field(
        "peak_all_generations",
        description="top examples: every generation of the capture ranked at the channel's top activity peak "
                    "(from the activation store), the recorded dataset examples at that peak, or those pooled "
                    "over every timestep; de-duplicated by prompt in every mode")
    n_examples: int | None = Field(
        10, ge=1, description="top prompts kept per channel (distinct prompts, the same for every basis, so "
                              "purities compare); None: all recorded")
    min_examples: int = Field(3, ge=1, description="labelled prompts a channel needs for a purity")
    alpha: float = Field(0.05, gt=0.0, lt=1.0,
                         description="false discovery rate: a (channel, family) is significant when its BH q-value "
                                     "is below this (over every channel x family pair of the variant)")
    permutations: int = Field(10000, ge=100, description="channel-label permutations of the agreement tests")
    bootstrap_resamples: int = Field(2000, ge=100, description="resamples of the bootstrap intervals")
    seed: int = Field(0, ge=0, description="seed of the permutations and bootstrap resamples")
    priors: bool = Field(True, description="classify the priors' images")
    dreams: bool = Field(True, description="classify the dreams' images")
    classifier_batch_size: int = Field(256, ge=1)
    recognisable_rmse: float = Field(
        0.15, gt=0.0, le=1.0, description="an image within this RMSE (0-1 pixels) of one of its world's renders is "
                                          "recognisable (models that declare a `world`)")

    def config_hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))
