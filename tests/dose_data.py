"""A hand-made dose-response grid for the inspector / HTML tests (:mod:`ddr_core.dose_response` format)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from ddr_core.dose_response import (
    GRID_SCHEMA,
    RECORD_FILE,
    channel_folder,
    grid_cells,
    summarise_dose_response,
)

HOSTILE_CONCEPT = "colour=<b>red</b> [x](http://e.example)"


def write_dose_grid(layout, variant: str, channel: int, concepts: str | None = HOSTILE_CONCEPT) -> Path:
    """Channel ``channel``'s grid (2 seeds, multiples 1 and 2; inside raises the concept probability to 0.9,
    outside leaves it at 0.2), its images (flat colours) and the variant's summary; returns the folder."""
    out = layout.stage_dir("dose_response", variant)
    folder = channel_folder(out, channel)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for window, multiple in grid_cells([1.0, 2.0]):
        for seed in (1, 2):
            path = folder / f"{window}_x{multiple:g}_seed{seed}.png"
            colour = {"none": 0, "inside": 200, "outside": 60, "all": 120}[window]
            Image.fromarray(np.full((8, 8, 3), colour, dtype=np.uint8)).save(path)
            prob = {"none": 0.2, "inside": 0.9, "outside": 0.2, "all": 0.8}[window]
            rows.append({"channel": channel, "window": window, "window_low": None if window == "none" else 400,
                         "window_high": None if window == "none" else 600, "multiple": multiple,
                         "strength": multiple, "seed": seed, "steered_steps": 0 if window == "none" else 5,
                         "peak": 501, "peak_max_activation": 1.0, "activation": prob, "activation_rel": prob,
                         "concepts": concepts, "concept_prob": prob if concepts else None,
                         "concept_hit": None, "image": layout.relative(path)})
    pl.DataFrame(rows, schema=GRID_SCHEMA, orient="row").write_parquet(folder / "grid.parquet")
    (folder / RECORD_FILE).write_text(json.dumps({"config_hash": "x", "channel": channel}))
    summarise_dose_response(out, layout.data_root, variant)
    return folder
