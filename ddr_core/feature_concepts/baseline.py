"""The regression check of the feature-concepts figures against the committed baseline
(``config/feature_concepts_baseline.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddr_core.config import PROJECT_ROOT

DEFAULT_BASELINE_PATH = PROJECT_ROOT / "config" / "feature_concepts_baseline.json"


def load_baseline(path: str | Path | None = None) -> dict[str, Any]:
    """The committed baseline (``{"tolerance": t, "tolerances": {...}, "variants": {v: {figure: value}}}``).

    Raises:
        FileNotFoundError / ValueError: naming the file and what is wrong.
    """
    path = Path(path) if path is not None else DEFAULT_BASELINE_PATH
    if not path.is_file():
        raise FileNotFoundError(f"feature-concepts baseline {path} does not exist; write one with "
                                f"`python -m ddr_core.feature_concepts baseline --summary <summary.json> --out {path}`")
    from ddr_core.json_input import read_json_file

    data = read_json_file(path, "fix the file by hand or rewrite it with `python -m ddr_core.feature_concepts "
                                "baseline --summary <summary.json> --out <this file>`")
    if not isinstance(data, dict) or not isinstance(data.get("variants", {}), dict):
        raise ValueError(f"{path}: expected an object with a 'variants' mapping")
    return data


def check_against_baseline(figures: dict[str, float], baseline: dict[str, Any], variant: str,
                           tolerance: float | None = None) -> dict[str, Any]:
    """Compare a variant's figures with its baseline entry: a figure regressed when it is more than the
    tolerance below the baseline (all figures are higher-is-better), or missing now.

    Tolerance: ``tolerance`` if given, else the baseline's ``tolerances[figure]``, else its
    ``tolerance`` (default 0.05).

    Returns:
        ``{"passed", "description", "regressions": [{"figure", "baseline", "value", "tolerance"}],
        "compared": {figure: {"baseline", "value", "delta"}}, "has_baseline"}``. No entry for the variant
        passes (nothing to regress against) and says so.
    """
    entry = (baseline.get("variants") or {}).get(variant)
    if not entry:
        return {"passed": True, "has_baseline": False, "regressions": [], "compared": {},
                "description": f"no baseline for {variant!r} yet: record one with `python -m "
                               f"ddr_core.feature_concepts baseline` once the numbers are trusted"}
    regressions, compared = [], {}
    for figure, expected in sorted(entry.items()):
        allowed = (tolerance if tolerance is not None
                   else (baseline.get("tolerances") or {}).get(figure, baseline.get("tolerance", 0.05)))
        value = figures.get(figure)
        compared[figure] = {"baseline": expected, "value": value,
                            "delta": None if value is None else round(value - expected, 6)}
        if value is None or value < expected - allowed:
            regressions.append({"figure": figure, "baseline": expected, "value": value, "tolerance": allowed})
    if regressions:
        description = "regressed: " + "; ".join(
            f"{r['figure']} " + ("missing" if r["value"] is None else f"{r['value']:.4f}")
            + f" < baseline {r['baseline']:.4f} - {r['tolerance']}" for r in regressions)
    else:
        description = f"{len(compared)} figure(s) within tolerance of the baseline"
    return {"passed": not regressions, "has_baseline": True, "regressions": regressions, "compared": compared,
            "description": description}


def baseline_entry(summary: dict[str, Any], figures: Sequence[str] | None = None) -> dict[str, float]:
    """The figures of a summary to commit as its variant's baseline (all, or the named ones)."""
    chosen = summary["figures"] if figures is None else {k: summary["figures"][k] for k in figures}
    return {k: round(float(v), 4) for k, v in sorted(chosen.items())}
