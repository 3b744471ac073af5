"""The concept-classifier labeller (kind ``concept-classifier``): the model's own concept classifier
(:func:`ddr_core.concept_classifier.model_concept_classifier`, toy world) predicts every image's value per family;
a feature's label is the ``family=value`` whose share among its labelling images most exceeds its share among
all images, and an image is detected when its predicted value of that family is the label's. Labels read like
the ``concept`` verdicts of :mod:`ddr_core.feature_concepts` (``colour=red``), so they can be checked against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ddr_core.labels.protocol import LabellerContext, lift_choice


class ConceptClassifierLabeller:
    kind = "concept-classifier"

    def __init__(self, classifier: Any, families: Sequence[str] | None = None, batch_size: int = 256) -> None:
        heads = classifier.config.heads
        self.classifier = classifier
        self.families = list(families) if families is not None else list(heads)
        missing = [f for f in self.families if f not in heads]
        if missing:
            raise ValueError(f"the concept classifier has no head for {missing} (heads: {sorted(heads)})")
        self.names = [f"{family}={value}" for family in self.families for value in heads[family]]
        self.batch_size = batch_size

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One-hot predictions: ``(n, len(self.names))`` floats, one 1 per family."""
        from ddr_core.feature_concepts.images import classify_images

        predicted = classify_images(self.classifier, images, self.families, self.batch_size)
        column = {name: i for i, name in enumerate(self.names)}
        out = np.zeros((len(images), len(self.names)))
        for family in self.families:
            for row, value in enumerate(predicted[family]):
                out[row, column[f"{family}={value}"]] = 1.0
        return out

    def label(self, encoded: np.ndarray, rows: np.ndarray) -> str | None:
        return lift_choice(encoded, rows, self.names)

    def detect(self, label: str, encoded: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if label not in self.names:
            raise ValueError(f"label {label!r} is not one of this classifier's values {self.names}")
        return encoded[rows, self.names.index(label)] > 0.5


def concept_classifier_labeller(context: LabellerContext) -> ConceptClassifierLabeller:
    """The labeller of ``context.model``'s concept classifier.

    Raises:
        ValueError: the model declares no concept classifier (names the config field).
    """
    from ddr_core.concept_classifier import model_concept_classifier

    classifier = model_concept_classifier(context.project, context.layout, context.model)
    if classifier is None:
        raise ValueError(f"labeller {context.name!r} (concept-classifier) labels with the model's concept classifier, "
                         f"but model {context.model!r} declares none: set models.{context.model}.concept_classifier "
                         f"or give it a clip labeller")
    return ConceptClassifierLabeller(classifier)
