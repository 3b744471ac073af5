"""Ground-truth concept scores of every channel / SAE feature of a variant whose prompts carry labels.

A model trained on a world with known concepts (:mod:`ddr_core.toy_world`: colour, shape, background)
lets a feature be scored against ground truth. For each channel (raw basis) or SAE feature of a
variant:

- **top examples**: the channel's top prompts, **one per prompt** (a prompt's best generation stands for
  it: a capture draws several images per prompt and labels belong to prompts, so counting images would
  let one prompt fill the list and no null could respect the data's structure).
  ``examples="peak_all_generations"`` (default) ranks every generation of the capture by its activation
  at the channel's highest activity peak (read from the activation store); ``"top_peak"`` uses the
  recorded dataset examples at that peak (``dataset_examples.parquet``: only generations in whose top-k
  the channel was, often few distinct prompts), ``"all_timesteps"`` those pooled over every timestep.
  ``n_examples`` keeps the first (default 10).
- **labels** of an example: the concept labels of its prompt, from the prompt dataset (JSONL fields,
  or a parser of the prompt text, e.g. :func:`ddr_core.toy_world.parse_prompt`; ``labels`` in the
  project config). Prompts without labels are left out and counted.
- **purity** of a family (colour, shape, background, ...): the share of the labelled top prompts holding
  the most common value, the **dominant** value (ties: the alphabetically first). ``purity`` is the mean
  over the families, ``purity_joint`` the share of the most common combination. Channels with fewer than
  ``min_examples`` labelled prompts get no purity (null).
- **the null** (:mod:`ddr_core.concept_stats`): labels permuted among prompts, i.e. the channel's ``k``
  top prompts a uniformly random ``k``-subset of the capture's labelled prompts. Under it the dominant
  value's count is the maximum of a multivariate hypergeometric draw, computed exactly:
  ``chance_purity_<f>`` its expectation / ``k``, ``p_<f>`` the probability of a purity at least as high
  (exact, so p-values of order 1e-7 resolve), ``q_<f>`` the Benjamini-Hochberg q-value over every
  (channel, family) pair of the variant. A channel is **selective for** ``family=value`` when
  ``q_<f> < alpha`` (default 0.05); ``concept`` lists those, empty for a channel that is not selective.
  ``purity_excess = purity - chance_purity``.
- **agreement** of the channel's priors and dreams: their PNG images are classified by the model's
  concept classifier (:mod:`ddr_core.concept_classifier`); per family, the share of the channel's
  images whose predicted value equals the channel's dominant value (``prior_agreement_<family>``,
  ``dream_agreement_<family>``; null without a dominant value or without images), and the most
  common prediction (``prior_vote_<family>``). Dream images are those of every dreamed timestep.
  ``<source>_agreement_selective`` averages only the families the channel is significantly selective
  for: a colour channel's shape agreement is noise.
  Summary tests (per family over every scored channel, and pooled over the significant channel x family
  pairs): the rate, its **per-image chance** (the share of all the source's images predicted as the
  channel's value), a **channel-label permutation** p-value (values permuted among channels within a
  family; each channel keeps its images) and a bootstrap interval over the units.
- **recognisability** (models that declare a ``world``, e.g. the toy world): each prior / dream image's
  RMSE to the nearest of 4000 renders of the world (:func:`ddr_core.toy_world.nearest_render_rmse`),
  ``<source>_world_rmse`` (median per channel) and ``<source>_recognisable`` (share within
  ``recognisable_rmse``, default 0.15). Concept-blind: it asks whether the picture shows *a* clean shape
  on a background at all, where agreement asks whether it shows the channel's one. The capture's own
  generations are scored alike (``world.generations``), the level a visualisation can reach.

Summary: the purity distribution (mean with a bootstrap interval over channels, median, quartiles, 10/90 %
quantiles; overall, per family, joint, chance, excess), the significance counts (selective channels of
the scored, with an interval, per family and value, the smallest p), the agreement tests per source and
family, counts, dominant-value counts, and ``figures``: the flat higher-is-better numbers the regression
check compares with a committed baseline (:func:`check_against_baseline`).

Outputs in ``out_dir`` (replaced as a whole, :func:`ddr_core.atomic.atomic_dir`):
``feature_concepts.parquet`` (one row per channel, columns :func:`table_columns`) and ``summary.json``.

Raw channels vs SAE features: the field claims SAE features are more monosemantic;
:func:`compare_bases` puts the summaries of a capture group's variants side by side, so whichever way
our data goes is visible.

The modules of this package (none imports torch: the inspector reads the outputs through it):

- :mod:`ddr_core.feature_concepts.config`: :class:`FeatureConceptsConfig` and the output file names;
- :mod:`ddr_core.feature_concepts.labels`: the concept labels of prompts (label parsers, labelled prompt files);
- :mod:`ddr_core.feature_concepts.purity`: a channel's top examples, their purity and its significance;
- :mod:`ddr_core.feature_concepts.images`: the priors' and dreams' images, their classification
  (agreement) and recognisability;
- :mod:`ddr_core.feature_concepts.summary`: the summary of a variant's table and its ``figures``;
- :mod:`ddr_core.feature_concepts.compute`: :func:`compute_feature_concepts` (the table and summary of a
  variant, written atomically) and :func:`read_feature_concepts`;
- :mod:`ddr_core.feature_concepts.basis_comparison`: raw channels vs SAE features (:func:`compare_bases`,
  :func:`basis_gap`);
- :mod:`ddr_core.feature_concepts.baseline`: the regression check against the committed baseline;
- :mod:`ddr_core.feature_concepts.stage`: the stage for one variant of the project configuration;
- :mod:`ddr_core.feature_concepts.cli`: ``python -m ddr_core.feature_concepts`` (write-prompts, score, baseline).
"""

from __future__ import annotations

from ddr_core.feature_concepts.baseline import (
    DEFAULT_BASELINE_PATH,
    baseline_entry,
    check_against_baseline,
    load_baseline,
)
from ddr_core.feature_concepts.basis_comparison import basis_gap, compare_bases, markdown_table
from ddr_core.feature_concepts.compute import (
    FeatureConceptsResult,
    compute_feature_concepts,
    read_feature_concepts,
)
from ddr_core.feature_concepts.config import (
    FORMAT,
    QUANTILES,
    SOURCES,
    SUMMARY_FILE,
    TABLE_FILE,
    FeatureConceptsConfig,
    LogFn,
)
from ddr_core.feature_concepts.images import (
    channel_agreement,
    channel_recognisability,
    classify_images,
    dream_images,
    image_predictions,
    load_images,
    prior_images,
)
from ddr_core.feature_concepts.labels import (
    LABEL_PARSER_FACTORIES,
    LabelParser,
    label_parser,
    labelled_prompt_records,
    prompt_labels,
    write_labelled_prompts,
)
from ddr_core.feature_concepts.purity import (
    channel_purity,
    dominant_value,
    peak_activations,
    significant_families,
    top_examples,
)
from ddr_core.feature_concepts.stage import feature_concepts_dir, feature_concepts_for_variant
from ddr_core.feature_concepts.summary import distribution, figures_of, summarise, table_columns

__all__ = [
    "DEFAULT_BASELINE_PATH", "FORMAT", "FeatureConceptsConfig", "FeatureConceptsResult",
    "LABEL_PARSER_FACTORIES", "LabelParser", "LogFn", "QUANTILES", "SOURCES", "SUMMARY_FILE", "TABLE_FILE",
    "baseline_entry", "basis_gap", "channel_agreement", "channel_purity", "channel_recognisability",
    "check_against_baseline", "classify_images", "compare_bases", "compute_feature_concepts", "distribution",
    "dominant_value", "dream_images", "feature_concepts_dir", "feature_concepts_for_variant", "figures_of",
    "image_predictions", "label_parser", "labelled_prompt_records", "load_baseline", "load_images",
    "markdown_table", "peak_activations", "prior_images", "prompt_labels", "read_feature_concepts",
    "significant_families", "summarise", "table_columns", "top_examples", "write_labelled_prompts",
]
