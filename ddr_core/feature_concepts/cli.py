"""``python -m ddr_core.feature_concepts``: write labelled prompts, score a variant, record a baseline."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ddr_core.feature_concepts.baseline import DEFAULT_BASELINE_PATH, baseline_entry, load_baseline
from ddr_core.feature_concepts.labels import LABEL_PARSER_FACTORIES, label_parser, write_labelled_prompts
from ddr_core.feature_concepts.stage import feature_concepts_for_variant


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddr_core.feature_concepts",
                                     description="Ground-truth concept scores of features (toy world).")
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("write-prompts", help="write a labelled prompt JSONL of a parser's world")
    prompts.add_argument("--parser", default="toy-world", choices=sorted(LABEL_PARSER_FACTORIES))
    prompts.add_argument("--out", required=True)
    score = commands.add_parser("score", help="score a variant of the project config")
    score.add_argument("--variant", required=True)
    score.add_argument("--data-root", default=None)
    score.add_argument("--experiment", default=None)
    baseline = commands.add_parser("baseline", help="record a summary's figures as its variant's baseline")
    baseline.add_argument("--summary", required=True, nargs="+", help="feature_concepts/<variant>/summary.json")
    baseline.add_argument("--out", default=str(DEFAULT_BASELINE_PATH))
    baseline.add_argument("--tolerance", type=float, default=None)
    args = parser.parse_args(argv)
    if args.command == "write-prompts":
        world = label_parser(args.parser)
        path = write_labelled_prompts(args.out, world.prompts(), args.parser)
        print(f"{len(world.prompts())} labelled prompts written to {path}")
    elif args.command == "score":
        from ddr_core.config import data_root, load_project_config
        from ddr_core.paths import DataLayout

        project = load_project_config()
        layout = DataLayout(args.data_root or data_root(), args.experiment or project.experiment)
        result = feature_concepts_for_variant(project, layout, args.variant, log=print)
        print(json.dumps({k: result.summary[k] for k in ("counts", "figures")}, indent=2))
    else:
        out = Path(args.out)
        current = load_baseline(out) if out.is_file() else {
            "description": "Committed feature_concepts figures; the asset check fails when one drops by more "
                           "than the tolerance.", "tolerance": 0.05, "variants": {}}
        if args.tolerance is not None:
            current["tolerance"] = args.tolerance
        for path in args.summary:
            summary = json.loads(Path(path).read_text(encoding="utf-8"))
            current.setdefault("variants", {})[summary["variant"]] = baseline_entry(summary)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"baseline for {sorted(current['variants'])} written to {out}")
    return 0
