"""The labeller interface and the registry of labeller kinds (``labellers.<name>.kind`` in the project config).

A labeller works in three steps so a variant's images are read by the (possibly large) model once:

- :meth:`Labeller.encode`: every image of the capture once (one row per image: predicted concepts, embeddings);
- :meth:`Labeller.label`: a label (short text) from the rows of a feature's labelling half;
- :meth:`Labeller.detect`: per row, does the label say the image shows the feature?

Adding a labeller: one module with a factory ``(LabellerContext) -> Labeller``, one line in
:data:`LABELLER_FACTORIES`, and the kind in :data:`ddr_core.config.LABELLER_KINDS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Labeller(Protocol):
    kind: str

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One row per RGB ``(H, W, 3)`` uint8 image."""

    def label(self, encoded: np.ndarray, rows: np.ndarray) -> str | None:
        """The label of the images ``rows`` of ``encoded`` (``None``: no label)."""

    def detect(self, label: str, encoded: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Boolean per row of ``rows``: does ``label`` say the image shows the feature?"""


@dataclass(frozen=True)
class LabellerContext:
    """What a factory may read: the labeller's config entry and, in a project, the model whose features it labels."""

    name: str
    config: Any  # ddr_core.config.LabellerConfig
    project: Any | None = None
    layout: Any | None = None
    model: str | None = None


LABELLER_FACTORIES: dict[str, str] = {
    "concept-classifier": "ddr_core.labels.toy:concept_classifier_labeller",
    "clip": "ddr_core.labels.clip:clip_labeller",
}
"""Labeller kind -> ``module:factory`` (imported on use: the CLIP one needs transformers)."""


def make_labeller(context: LabellerContext) -> Labeller:
    """The labeller of ``context.config.kind``.

    Raises:
        KeyError: an unknown kind (names the known ones).
    """
    kind = context.config.kind
    if kind not in LABELLER_FACTORIES:
        raise KeyError(f"unknown labeller kind {kind!r}; known: {sorted(LABELLER_FACTORIES)}")
    module, function = LABELLER_FACTORIES[kind].split(":")
    factory: Callable[[LabellerContext], Labeller] = getattr(importlib.import_module(module), function)
    return factory(context)


def lift_choice(scores: np.ndarray, rows: np.ndarray, names: Sequence[str]) -> str | None:
    """The name whose mean score over ``rows`` most exceeds its mean over every row (ties: the first): a label
    that every image gets (a common background) is not chosen for being common. ``scores``: ``(n, len(names))``."""
    if not len(rows) or not len(names):
        return None
    lift = scores[rows].mean(axis=0) - scores.mean(axis=0)
    return names[int(np.argmax(lift))]
