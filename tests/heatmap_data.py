"""Hand-made heatmaps (through the real writer, :func:`ddr_core.heatmaps.write_channel_heatmaps`) for the viewers'
tests: one channel, two examples, a planted pattern whose heat lies on the left half of a known mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddr_core.heatmaps import STAGE, HeatmapConfig, SceneFit, write_channel_heatmaps, write_union
from ddr_core.paths import DataLayout
from ddr_core.regenerate import CapturedGeneration, PositionRecording

STEPS = 4
PROMPTS = ("a red circle on a black background", "a blue square on a white background")


def write_heatmaps(layout: DataLayout, variant: str, channel: int, prompts: tuple[str, ...] = PROMPTS) -> Path:
    """Heatmaps of ``channel`` of ``variant`` (generations 7 and 9) under ``layout``; returns their folder."""
    maps = torch.zeros(len(prompts), STEPS, 1, 4, 4)
    for step in range(STEPS):
        maps[:, step, 0, :, :2] = 1.0 + step  # the left half, growing with the step
    generations = [CapturedGeneration(generation_id=7 + 2 * i, prompt=p, seed=100 + i, height=32, width=32,
                                      num_inference_steps=STEPS, guidance_scale=3.0) for i, p in enumerate(prompts)]
    recording = PositionRecording(maps=maps, timesteps=[900, 600, 300, 50], latents=torch.zeros(len(prompts), 4, 4, 4),
                                  generations=generations)
    half = np.zeros((32, 32))
    half[:, :16] = 1.0
    ids = [g.generation_id for g in generations]
    images = {g: Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)) for g in ids}
    fits = {g: SceneFit(half, 0.05, "square", 8.0, 8.0, 16.0) for g in ids}
    out_dir = layout.stage_dir(STAGE, variant)
    write_channel_heatmaps(out_dir, layout.data_root, channel, 0, recording, {g: i for i, g in enumerate(ids)},
                           images, fits, [(g, 3.0 - i) for i, g in enumerate(ids)], HeatmapConfig(frame_size=32))
    write_union(out_dir)
    return out_dir
