"""``benchmarks/toy_world_rich.py``: the per-family rows it reports beside the pre-registered comparison
(docs/TOY_WORLD.md): each family's mean purity, chance, selective units and SAE minus raw with its interval."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("toy_world_rich_under_test", REPO / "benchmarks" / "toy_world_rich.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _table(colour: list[float], shape: list[float], q_colour: list[float]) -> pl.DataFrame:
    n = len(colour)
    return pl.DataFrame({
        "purity": [(c + s) / 2 for c, s in zip(colour, shape, strict=True)],
        "purity_colour": colour, "chance_purity_colour": [0.3] * n, "q_colour": q_colour,
        "purity_shape": shape, "chance_purity_shape": [0.4] * n, "q_shape": [1.0] * n,
    })


def test_per_family_gives_each_familys_means_selective_units_and_a_gap_interval(bench):
    raw = _table([0.5, 0.6, 0.5, 0.6], [0.5, 0.5, 0.4, 0.4], [0.01, 0.2, 0.3, 0.04])
    sae = _table([0.9, 1.0, 0.9, 1.0, 0.9, 1.0], [0.5, 0.4, 0.5, 0.4, 0.5, 0.4], [0.01] * 6)
    sae = pl.concat([sae, sae.head(1).with_columns(pl.lit(None, dtype=pl.Float64).alias("purity"))])  # not scored
    rows = bench.per_family(raw, sae, ["colour", "shape"])
    colour, shape = rows["colour"], rows["shape"]
    assert colour["raw"] == pytest.approx(0.55) and colour["sae"] == pytest.approx(0.95)
    assert colour["gap"] == pytest.approx(0.40) and 0 < colour["interval"][0] <= 0.40 <= colour["interval"][1]
    assert (colour["raw_selective"], colour["raw_units"], colour["sae_selective"], colour["sae_units"]) == (2, 4, 6, 6)
    assert colour["raw_chance"] == pytest.approx(0.3) and shape["sae_chance"] == pytest.approx(0.4)
    assert shape["gap"] == pytest.approx(0.0) and shape["interval"][0] < 0 < shape["interval"][1]
    assert shape["raw_selective"] == shape["sae_selective"] == 0
    assert not any(math.isnan(v) for v in colour["interval"] + shape["interval"])
