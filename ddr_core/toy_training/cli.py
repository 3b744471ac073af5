"""``python -m ddr_core.toy_training``: train, evaluate or compare a toy model (usage in
:mod:`ddr_core.toy_training`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ddr_core.concept_classifier import ClassifierTrainingConfig
from ddr_core.toy_training.config import ToyEvaluationConfig, ToyModelConfig, ToyTrainingConfig
from ddr_core.toy_training.evaluation import evaluate_toy_model
from ddr_core.toy_training.reproduction import (
    REPRODUCTION_FILENAME,
    REPRODUCTION_TOLERANCE,
    compare_with_shipped,
    format_comparison,
)
from ddr_core.toy_training.run import train_toy_model
from ddr_core.toy_world import WORLDS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddr_core.toy_training",
        description="Train (or evaluate) the toy-world Stable-Diffusion-architecture model.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="Output folder: diffusers pipeline + concept_classifier/ + report.")
    target.add_argument("--evaluate", metavar="MODEL_DIR", help="Only score an existing toy model folder.")
    target.add_argument("--compare", metavar="MODEL_DIR",
                        help="Only compare a trained folder with --compare-with (no training).")
    parser.add_argument("--compare-with", metavar="SHIPPED_DIR", default=None,
                        help="After training (or with --compare): check the quality figures against this folder "
                             "(e.g. models/toy-world); exit 1 when one falls more than --tolerance below it")
    parser.add_argument("--tolerance", type=float, default=REPRODUCTION_TOLERANCE)
    parser.add_argument(
        "--minutes", type=float, default=None, help="Wall-clock cap (safety stop) in minutes; none by default"
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model and the classifier runs.")
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--classifier-steps", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--eval-images-per-prompt", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--inference-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    parser.add_argument("--world", choices=WORLDS, default="shapes",
                        help="toy world: shapes (the shipped models/toy-world), shapes-rich (docs/TOY_WORLD.md) or "
                             "shapes-no-yellow (models/toy-world-no-yellow, docs/MATCHING.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluation = replace(
        ToyEvaluationConfig(),
        **{
            key: value
            for key, value in {
                "images_per_prompt": args.eval_images_per_prompt,
                "guidance_scale": args.guidance_scale,
                "num_inference_steps": args.inference_steps,
            }.items()
            if value is not None
        },
    )
    if args.evaluate is not None:
        print(json.dumps(evaluate_toy_model(args.evaluate, evaluation=evaluation), indent=2))
        return 0
    if args.compare is not None:
        if args.compare_with is None:
            parser.error("--compare needs --compare-with SHIPPED_DIR")
        return _report_comparison(args.compare, args.compare_with, args.tolerance)
    classifier = ClassifierTrainingConfig(seed=args.seed)
    if args.classifier_steps is not None:
        classifier = replace(classifier, steps=args.classifier_steps)
    overrides = {
        key: value
        for key, value in {
            "vae_steps": args.vae_steps,
            "unet_steps": args.unet_steps,
            "num_images": args.num_images,
            "world": args.world,
        }.items()
        if value is not None
    }
    training = replace(
        ToyTrainingConfig(seed=args.seed, max_minutes=args.minutes, classifier=classifier), **overrides
    )
    train_toy_model(args.out, ToyModelConfig(), training, evaluation, verbose=True)
    if args.compare_with is not None:
        return _report_comparison(args.out, args.compare_with, args.tolerance)
    return 0


def _report_comparison(new_dir: str, shipped_dir: str, tolerance: float) -> int:
    result = compare_with_shipped(new_dir, shipped_dir, tolerance)
    (Path(new_dir) / REPRODUCTION_FILENAME).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_comparison(result))
    return 0 if result["reproduced"] else 1
