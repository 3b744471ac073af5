"""Power simulation of toy-world designs (issue 14 item 4): run BEFORE comparing SAE and raw purity on a world.

For each candidate design (concept families, prompts, images per prompt, layer and SAE widths, top prompts
scored), plants selective, polysemantic and null units with synthetic labels and scores them with the
platform's own statistics (:mod:`ddr_core.toy_training.power`): the power to find a selective channel at
FDR 0.05, the false discoveries, and the power to see an SAE-minus-raw purity gap of the planted size with
the 95% bootstrap interval above 0. The chosen design and why are in docs/TOY_WORLD.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy_world_power.py            # ~10 min on a shared 2-core box
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy_world_power.py --quick    # a few seconds (smoke run)

Writes ``benchmarks/results/toy_world_power.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ddr_core.toy_training.power import PlantedBasis, WorldDesign, simulate_power

CURRENT = {"colour": 4, "shape": 3, "background": 3}
RICH = {"colour": 6, "shape": 4, "background": 3, "size": 2, "position": 4}

DESIGNS: tuple[WorldDesign, ...] = (
    WorldDesign("shapes 36x5 (today's demo)", CURRENT, None, 5),
    WorldDesign("shapes 36x10", CURRENT, None, 10),
    WorldDesign("rich 144x2", RICH, 144, 2),
    WorldDesign("rich 288x1", RICH, 288, 1),
    WorldDesign("rich 576x1", RICH, None, 1),
    WorldDesign("rich 576x1 top-20", RICH, None, 1, n_examples=20),
)
"""Candidate designs: today's world and capture, and the rich world (576 prompts) at three capture sizes."""

EFFECTS: tuple[float, ...] = (1.0, 2.0, 3.0)
"""Activation per planted concept value, in units of the prompt-level (= image-level) noise."""

SCENARIOS: dict[str, tuple[PlantedBasis, PlantedBasis]] = {
    # raw channels: half of the responding ones hold two values of one family; SAE features: 10% do
    "superposed": (PlantedBasis(0.6, 0.5), PlantedBasis(0.6, 0.1)),
    # no difference: both bases alike (the gap's false-positive rate)
    "no-gap": (PlantedBasis(0.6, 0.3), PlantedBasis(0.6, 0.3)),
    # raw channels superposed across families ("red or circle"): mean purity cannot see it
    "across": (PlantedBasis(0.6, 0.5, poly_mode="across"), PlantedBasis(0.6, 0.1, poly_mode="across")),
}


def run(designs: tuple[WorldDesign, ...], effects: tuple[float, ...], scenarios: dict[str, tuple[PlantedBasis,
        PlantedBasis]], repetitions: int, seed: int) -> list[dict]:
    rows = []
    for design in designs:
        for effect in effects:
            for name, (raw, sae) in scenarios.items():
                raw_e = PlantedBasis(**{**raw.__dict__, "effect": effect})
                sae_e = PlantedBasis(**{**sae.__dict__, "effect": effect})
                started = time.perf_counter()
                result = simulate_power(design, raw_e, sae_e, repetitions=repetitions, seed=seed)
                result.update(scenario=name, effect=effect, seconds=time.perf_counter() - started)
                rows.append(result)
                print(f"{design.name:28s} effect {effect:.1f} {name:10s} mono {result['raw_power_mono']:.2f} "
                      f"gap {result['gap']:+.3f} power {result['gap_power']:.2f} ({result['seconds']:.1f}s)",
                      flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = ("design", "gens", "chance", "effect", "scenario", "raw mono", "raw poly", "SAE mono", "null FP",
               "false disc.", "gap", "gap power", "best-family gap", "its power")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = (r["design"]["name"], r["design"]["generations"], f"{r['chance_purity']:.3f}", f"{r['effect']:.0f}",
                 r["scenario"], f"{r.get('raw_power_mono', float('nan')):.2f}",
                 f"{r.get('raw_power_poly', float('nan')):.2f}", f"{r.get('sae_power_mono', float('nan')):.2f}",
                 f"{r.get('raw_false_positive_null', float('nan')):.3f}",
                 f"{r.get('raw_false_discovery', float('nan')):.3f}", f"{r['gap']:+.3f}", f"{r['gap_power']:.2f}",
                 f"{r['best_gap']:+.3f}", f"{r['best_gap_power']:.2f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="two designs, one effect, 2 repetitions")
    parser.add_argument("--out", default="benchmarks/results/toy_world_power.json")
    args = parser.parse_args()
    designs, effects, repetitions = DESIGNS, EFFECTS, args.repetitions
    if args.quick:
        designs, effects, repetitions = (DESIGNS[0], DESIGNS[3]), (2.0,), 2
    rows = run(designs, effects, SCENARIOS, repetitions, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"repetitions": repetitions, "seed": args.seed, "rows": rows}, indent=1)
                              + "\n", encoding="utf-8")
    print(markdown(rows))


if __name__ == "__main__":
    main()
