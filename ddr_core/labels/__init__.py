"""What to call a feature: an automatic label from its top dataset examples, with a held-out detection score.

Per feature (raw channel or SAE feature of a variant), delphi-style:

- its prompts ranked by their best generation's activation at the feature's top activity peak (one image per
  prompt: a capture's images cluster by prompt); the ``n_top`` best are its **top examples**;
- the top examples are split **by prompt** into a labelling half and a held-out half;
- a **labeller** (:mod:`ddr_core.labels.protocol`; kinds ``concept-classifier``: :mod:`ddr_core.labels.toy`,
  ``clip``: :mod:`ddr_core.labels.clip`) names the labelling half;
- the **detection score** (:mod:`ddr_core.labels.detection`): the balanced accuracy with which the label picks the
  held-out top examples out of negatives (prompts at most at the ``negative_quantile`` of the feature's
  activations; half of them hard: prompts sharing all but one concept value with a held-out positive, or the
  highest activators of that pool), chance 0.5, a prompt-permutation p-value (BH over the variant's features:
  ``significant``) and a bootstrap interval over prompts;
- on the toy world the label is checked against the truth: ``label_matches`` (the label is one of the feature's
  significant concepts from :mod:`ddr_core.feature_concepts`), with a label-permutation chance.

Compute: :func:`ddr_core.labels.compute.label_features`; the stage: :func:`ddr_core.labels.stage.feature_labels_for_variant`.
No module here imports torch at import time (the inspector reads the outputs through this package).
"""

from __future__ import annotations

from ddr_core.labels.compute import (
    FORMAT,
    SCHEMA,
    SUMMARY_FILE,
    TABLE_FILE,
    FeatureLabelsConfig,
    label_features,
    match_test,
    read_feature_labels,
    summarise_labels,
    write_feature_labels,
)
from ddr_core.labels.detection import (
    CHANCE,
    balanced_accuracy,
    choose_negatives,
    detection_test,
    permutation_p_value,
    split_by_prompt,
)
from ddr_core.labels.protocol import LABELLER_FACTORIES, Labeller, LabellerContext, lift_choice, make_labeller
from ddr_core.labels.stage import feature_labels_dir, feature_labels_for_variant

__all__ = [
    "CHANCE", "FORMAT", "LABELLER_FACTORIES", "SCHEMA", "SUMMARY_FILE", "TABLE_FILE", "FeatureLabelsConfig",
    "Labeller", "LabellerContext", "balanced_accuracy", "choose_negatives", "detection_test", "feature_labels_dir",
    "feature_labels_for_variant", "label_features", "lift_choice", "make_labeller", "match_test", "permutation_p_value",
    "read_feature_labels", "split_by_prompt", "summarise_labels", "write_feature_labels",
]
