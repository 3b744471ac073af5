"""A real ``kill -9`` of a capture process mid-run, then a re-run: complete, equal, no duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl

from ddr_core.activation_store import ActivationStore
from ddr_core.activations import CaptureConfig, run_capture
from ddr_core.basis import RawChannels
from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER

CONFIG = dict(num_images_per_prompt=1, batch_size=2, num_inference_steps=8, seed=3)
PROMPTS = list(TINY_PROMPTS[:16])  # 8 batches

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ddr_core.activations import CaptureConfig, run_capture
    from ddr_core.basis import RawChannels
    from ddr_core.pipeline import load_pipeline
    from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER
    model_dir, root, data_root = map(Path, sys.argv[1:4])
    pipe = load_pipeline(model_dir)
    run_capture(pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, list(TINY_PROMPTS[:16]), root, data_root,
                CaptureConfig(**__CONFIG__))
""").replace("__CONFIG__", repr(CONFIG))


def _dense(root: Path) -> np.ndarray:
    parts = sorted(ActivationStore(root).iter_dense("raw"), key=lambda p: p[0][0])
    return np.concatenate([p[2] for p in parts])


def test_kill_minus_nine_then_rerun(tiny_model_dir, tiny_pipe, tmp_path):
    root = tmp_path / "capture"
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(root), str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (root / "done" / "batch_00001.json").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "capture did not reach its second batch"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = ActivationStore(root).finished_batches()
    assert 2 <= len(finished) < 8, finished  # killed mid-way

    result = run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, PROMPTS, root, tmp_path,
                         CaptureConfig(**CONFIG))
    assert result.summary["complete"] and set(result.batches_skipped) == finished
    reference = tmp_path / "reference"
    run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, PROMPTS, reference, tmp_path,
                CaptureConfig(**CONFIG))
    np.testing.assert_allclose(_dense(root), _dense(reference), rtol=1e-3, atol=1e-3)
    gens = pl.read_parquet(root / "generations.parquet")
    assert gens.height == gens["generation_id"].n_unique() == 16
    assert not list(root.rglob("*.tmp-*"))
