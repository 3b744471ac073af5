"""Are SAE features purer than raw channels on the richer toy world? The comparison docs/TOY_WORLD.md fixed.

Reads a data root where the demo graph ran on ``toy-rich-raw`` and ``toy-rich-sae`` (and, when present,
today's ``toy-raw`` / ``toy-sae``: the baseline rows), and prints per (raw, SAE) pair:

- **primary** (decides "SAE purer"): the ``basis_gap`` mean-purity gap, top 10 distinct prompts, SAE minus raw,
  95% bootstrap interval over units (the demo's last line);
- secondary (reported, not deciding): the same with the top 20 prompts (rescored into a temporary folder),
  the best family's purity-excess gap, and the share of selective units.
- per family (reported, not deciding): each family's mean purity, its selective units, SAE minus raw.

Run after the steps in docs/TOY_WORLD.md ("How to run the comparison")::

    DDR_DATA_ROOT=/tmp/rich-demo OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy_world_rich.py

Writes ``benchmarks/results/toy_world_rich.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import polars as pl

PAIRS: tuple[tuple[str, str], ...] = (("toy-rich-raw", "toy-rich-sae"), ("toy-raw", "toy-sae"))


def best_family_excess(table: pl.DataFrame, families: list[str]) -> list[float]:
    """Per scored unit, the largest ``purity_<f> - chance_purity_<f>`` over the families."""
    out = []
    for row in table.filter(pl.col("purity").is_not_null()).iter_rows(named=True):
        values = [row[f"purity_{f}"] - row[f"chance_purity_{f}"] for f in families
                  if row.get(f"purity_{f}") is not None and row.get(f"chance_purity_{f}") is not None
                  and not math.isnan(row[f"chance_purity_{f}"])]
        if values:
            out.append(max(values))
    return out


def per_family(raw: pl.DataFrame, sae: pl.DataFrame, families: list[str]) -> dict[str, dict[str, Any]]:
    """Per family (reported, not deciding): mean purity (top 10) of the scored units, its chance, the units
    selective for that family (BH ``q < 0.05``), and SAE minus raw with its 95% bootstrap interval over units."""
    from ddr_core.concept_stats import bootstrap_difference

    out: dict[str, dict[str, Any]] = {}
    for family in families:
        column = f"purity_{family}"
        values = {}
        for name, table in (("raw", raw), ("sae", sae)):
            scored = table.filter(pl.col("purity").is_not_null())
            values[name] = scored[column].drop_nulls().to_list()
            values[f"{name}_units"] = scored.height
            values[f"{name}_selective"] = int((scored[f"q_{family}"] < 0.05).sum())
            values[f"{name}_chance"] = float(scored[f"chance_purity_{family}"].drop_nans().mean())
        a, b = values.pop("sae"), values.pop("raw")
        low, high = bootstrap_difference(a, b)
        out[family] = {"sae": sum(a) / len(a), "raw": sum(b) / len(b), "gap": sum(a) / len(a) - sum(b) / len(b),
                       "interval": [low, high], **values}
    return out


def compare(project: Any, layout: Any, raw: str, sae: str, score: bool = False) -> dict[str, Any] | None:
    from ddr_core.concept_stats import bootstrap_difference
    from ddr_core.feature_concepts import (
        FeatureConceptsConfig,
        basis_gap,
        feature_concepts_dir,
        feature_concepts_for_variant,
        read_feature_concepts,
    )

    tables = {v: read_feature_concepts(feature_concepts_dir(layout, v)) for v in (raw, sae)}
    if score and any(t is None for t in tables.values()):  # purity only, from the capture and its statistics
        with tempfile.TemporaryDirectory() as folder:
            config = FeatureConceptsConfig(priors=False, dreams=False)
            tables = {v: (feature_concepts_for_variant(project, layout, v, config, out_dir=Path(folder) / v).table,)
                      for v in (raw, sae)}
    if any(t is None for t in tables.values()):
        return None
    families = list(project.prompt_datasets[project.variants[raw].prompts].labels.families)
    result: dict[str, Any] = {"raw": raw, "sae": sae, "families": families,
                              "primary_top10": basis_gap(tables[raw][0], tables[sae][0])}
    a, b = best_family_excess(tables[sae][0], families), best_family_excess(tables[raw][0], families)
    low, high = bootstrap_difference(a, b)
    result["best_family_excess"] = {"sae": sum(a) / len(a), "raw": sum(b) / len(b),
                                    "gap": sum(a) / len(a) - sum(b) / len(b), "interval": [low, high]}
    result["per_family"] = per_family(tables[raw][0], tables[sae][0], families)
    top20 = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in (raw, sae):
            config = FeatureConceptsConfig(n_examples=20, priors=False, dreams=False)
            rescored = feature_concepts_for_variant(project, layout, variant, config, out_dir=Path(folder) / variant)
            top20[variant] = rescored.table
    result["secondary_top20"] = basis_gap(top20[raw], top20[sae])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/toy_world_rich.json")
    parser.add_argument("--score", action="store_true",
                        help="score purity here when the demo stopped before feature_concepts (demo --until "
                             "timestep_stats): no priors or dreams needed")
    args = parser.parse_args()
    from ddr_core.config import load_project_config
    from ddr_resources.resources import DdrStorage

    project = load_project_config()
    layout = DdrStorage().layout
    results = []
    for raw, sae in PAIRS:
        try:
            result = compare(project, layout, raw, sae, args.score)
        except FileNotFoundError as error:  # that pair's capture or statistics are not in this data root
            print(f"{sae} minus {raw}: skipped ({error})")
            continue
        if result is not None:
            results.append(result)
    if not results:
        raise SystemExit(f"no feature_concepts tables of {PAIRS} under {layout.data_root}: run the demo graph first "
                         "(docs/TOY_WORLD.md, 'How to run the comparison')")
    for r in results:
        print(f"{r['sae']} minus {r['raw']} ({', '.join(r['families'])})")
        for name in ("primary_top10", "secondary_top20"):
            for metric, values in r[name].items():
                print(f"  {name:16s} {metric:16s} sae {values['sae']:.3f} raw {values['raw']:.3f} "
                      f"gap {values['gap']:+.3f} [{values['interval'][0]:+.3f}, {values['interval'][1]:+.3f}]")
        best = r["best_family_excess"]
        print(f"  {'secondary':16s} {'best-family exc.':16s} sae {best['sae']:.3f} raw {best['raw']:.3f} "
              f"gap {best['gap']:+.3f} [{best['interval'][0]:+.3f}, {best['interval'][1]:+.3f}]")
        for family, f in r["per_family"].items():
            print(f"  {'family':16s} {family:16s} sae {f['sae']:.3f} ({f['sae_selective']}/{f['sae_units']}) "
                  f"raw {f['raw']:.3f} ({f['raw_selective']}/{f['raw_units']}) chance {f['raw_chance']:.3f} "
                  f"gap {f['gap']:+.3f} [{f['interval'][0]:+.3f}, {f['interval'][1]:+.3f}]")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
