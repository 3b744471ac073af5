"""The reproduction check: a retrained toy-model folder's quality figures and weights against the shipped
one (:func:`compare_with_shipped`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddr_core.toy_training.config import REPORT_FILENAME

REPRODUCTION_FILENAME = "reproduction.json"
REPRODUCTION_TOLERANCE = 0.05
"""How far a quality figure (a share in 0-1) may fall below the shipped model's and still reproduce it."""


def quality_figures(report: dict[str, Any]) -> dict[str, float]:
    """The higher-is-better quality figures of a training report: classifier accuracy on held-out renders
    and on their VAE reconstructions, and the generated images' agreement with their prompts, per family."""
    figures: dict[str, float] = {}
    classifier = report.get("classifier") or {}
    for section in ("accuracy_on_renders", "accuracy_on_vae_reconstructions"):
        for family, value in (classifier.get(section) or {}).items():
            figures[f"classifier_{section}_{family}"] = float(value)
    generation = report.get("generation") or {}
    for family in ("colour", "shape", "background"):
        if family in generation:
            figures[f"generation_{family}"] = float(generation[family])
    return figures


def _weight_hashes(model_dir: Path) -> dict[str, str]:
    import hashlib

    hashes = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        hashes[path.relative_to(model_dir).as_posix()] = digest.hexdigest()
    return hashes


def compare_with_shipped(new_dir: str | Path, shipped_dir: str | Path,
                         tolerance: float = REPRODUCTION_TOLERANCE) -> dict[str, Any]:
    """Does a retrained toy model reproduce the shipped one? Compares the quality figures of the two
    ``toy_training_report.json`` (:func:`quality_figures`): each new figure must be at least the shipped one
    minus ``tolerance``. Also says whether every weight file (``*.safetensors``) is byte-identical, which a
    run with the same seed, steps and thread count on the same kind of machine gives.

    Returns:
        ``{"reproduced", "tolerance", "figures": [{figure, shipped, new, delta, ok}], "missing",
        "weights_identical", "weights_differing"}``.

    Raises:
        FileNotFoundError: a folder has no training report (names the folder and how to make one).
    """
    new_dir, shipped_dir = Path(new_dir), Path(shipped_dir)
    reports = {}
    for name, folder in (("new", new_dir), ("shipped", shipped_dir)):
        path = folder / REPORT_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no {REPORT_FILENAME} in {folder} ({name}): train one with "
                                    f"`python -m ddr_core.toy_training --out {folder}` (make train-toy)")
        reports[name] = json.loads(path.read_text(encoding="utf-8"))
    shipped, new = quality_figures(reports["shipped"]), quality_figures(reports["new"])
    rows = []
    for figure, value in shipped.items():
        if figure not in new:
            continue
        delta = new[figure] - value
        rows.append({"figure": figure, "shipped": value, "new": new[figure], "delta": delta,
                     "ok": bool(delta >= -tolerance - 1e-12)})
    missing = sorted(set(shipped) - set(new))
    new_hashes, shipped_hashes = _weight_hashes(new_dir), _weight_hashes(shipped_dir)
    differing = sorted(name for name in set(new_hashes) | set(shipped_hashes)
                       if new_hashes.get(name) != shipped_hashes.get(name))
    return {"reproduced": all(row["ok"] for row in rows) and not missing and bool(rows),
            "tolerance": tolerance, "figures": rows, "missing": missing,
            "weights_identical": not differing and bool(new_hashes), "weights_differing": differing,
            "new": str(new_dir), "shipped": str(shipped_dir)}


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as a text table with a verdict line."""
    lines = [f"{'figure':54s} {'shipped':>8s} {'new':>8s} {'delta':>8s}"]
    for row in result["figures"]:
        mark = "" if row["ok"] else f"   below the shipped value by more than {result['tolerance']}"
        lines.append(f"{row['figure']:54s} {row['shipped']:8.3f} {row['new']:8.3f} {row['delta']:+8.3f}{mark}")
    for figure in result["missing"]:
        lines.append(f"{figure:54s} missing from the new report")
    weights = ("byte-identical" if result["weights_identical"]
               else f"differ in {len(result['weights_differing'])} file(s) (expected on another machine, "
                    f"thread count or library version; the figures decide)")
    verdict = "REPRODUCED" if result["reproduced"] else "NOT REPRODUCED"
    lines.append(f"weights {weights}")
    lines.append(f"{verdict}: quality figures of {result['new']} vs {result['shipped']} "
                 f"(tolerance {result['tolerance']})")
    return "\n".join(lines)
