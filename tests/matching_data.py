"""A finished ``feature_matches[toy-raw__toy-sae]`` on the inspector's toy data root (tests/representation_data.py),
for the viewers' tests: toy-raw's units 0-5 have copies in toy-sae except unit 2, which fires for the second colour
and vanished; the prompts' colours are whatever the caller passes (hostile strings in the viewers' tests)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddr_core import representation as rep
from ddr_core.activation_store import ActivationStore, VariantBatch
from tests.representation_data import VARIANT, make_toy_data_root

COMPARISON = "toy-raw__toy-sae"


def make_matched_toy(root: Path, colours: Sequence[str]):
    """The toy data root under ``root`` with shards, index, a labelled prompt file (24 prompts, ``colours`` in turn)
    and the comparison's output; returns the toy data (``layout``, ``data_root``)."""
    from ddr_core.comparisons import ComparisonConfig
    from ddr_core.config import load_project_config
    from ddr_core.feature_matching_stage import feature_matches_for_comparison

    toy = make_toy_data_root(root)
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    labels = [{"text": f"prompt {i}", "colour": colours[i % len(colours)],
               "shape": ["circle", "square", "triangle"][i % 3], "background": "black"} for i in range(24)]
    folder = toy.layout.prompts_dir("toy-world-prompts")
    folder.mkdir(parents=True)
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels), encoding="utf-8")
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(24), 2)
    signal = rng.standard_normal((24, 6))
    signal[[i for i in range(24) if i % len(colours) == 1], 2] += 3.0  # unit 2 fires for the second colour
    raw = (signal[groups][:, None, :] + 0.1 * rng.standard_normal((48, 3, 6))).astype(np.float32)
    sae = np.concatenate([raw[:, :, [0, 1, 3, 4, 5]], rng.standard_normal((48, 3, 3))], axis=2).astype(np.float32)
    store = ActivationStore(toy.layout.activations_dir("toy-world"))
    store.write_batch(0, [{"generation_id": g, "prompt_index": g // 2, "prompt": labels[g // 2]["text"],
                           "image_index": g % 2, "seed": g, "image_path": ""} for g in range(48)],
                      [900, 500, 100], {"toy-raw": VariantBatch(raw), "toy-sae": VariantBatch(sae)})
    store.finalize()
    project = load_project_config()
    project.comparisons[COMPARISON] = ComparisonConfig(same_space=False)
    feature_matches_for_comparison(project, toy.layout, COMPARISON,
                                   toy.layout.stage_dir("feature_matches", COMPARISON))
    return toy
