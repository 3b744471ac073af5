"""Hand-made automatic labels (through the real writer, :func:`ddr_core.labels.write_feature_labels`) for the
viewers' tests: channel 0 significant with a concept to check, channel 1 not significant; hostile labels by default
(tests/markdown_check.py HOSTILE: a Markdown link and an HTML link)."""

from __future__ import annotations

import polars as pl

from ddr_core.labels import SCHEMA, write_feature_labels
from ddr_core.paths import DataLayout
from tests.markdown_check import HOSTILE

LABEL = HOSTILE[1]  # "a cat [click](http://attacker.example/phish) on a sofa"
HTML_LABEL = HOSTILE[3]  # '<a href="http://attacker.example/html">x</a>'


def write_labels(layout: DataLayout, variant: str, labels: tuple[str, str] = (LABEL, HTML_LABEL)) -> None:
    """The ``feature_labels`` outputs of ``variant``: ``labels[0]`` on channel 0 (score 0.90, significant),
    ``labels[1]`` on channel 1 (0.45, not significant)."""
    rows = [{name: None for name in SCHEMA} for _ in range(2)]
    rows[0].update({"channel": 0, "label": labels[0], "score": 0.9, "chance": 0.5, "p_value": 0.001,
                    "q_value": 0.004, "significant": True, "score_low": 0.8, "score_high": 1.0, "tpr": 0.8,
                    "tnr": 1.0, "tnr_hard": 1.0, "tnr_easy": 1.0, "n_labelling": 5, "n_positive": 5,
                    "n_negative": 10, "n_hard": 5, "concept": "colour=red", "label_matches": False})
    rows[1].update({"channel": 1, "label": labels[1], "score": 0.45, "chance": 0.5, "p_value": 0.7, "q_value": 0.7,
                    "significant": False, "score_low": 0.3, "score_high": 0.6, "n_positive": 5, "n_negative": 10})
    table = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    summary = {"labeller": "clip-test", "labeller_kind": "clip", "channels": 2, "scored": 2, "significant": 1,
               "chance": 0.5, "score_mean": 0.675, "score_interval": [0.45, 0.9]}
    write_feature_labels(layout.stage_dir("feature_labels", variant), table, summary)
