"""Shared fixtures: the embedded tiny Stable-Diffusion-shaped model and a random SAE for it.

Built once per test session into a temporary folder (a few seconds on CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers ``StableDiffusionPipeline`` folder of the tiny model (default config)."""
    from ddr_core.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_model") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sae_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding ``unet.up_blocks.1.attentions.1/`` with a random SAE for the tiny model."""
    from ddr_core.tiny_model import build_tiny_sae

    root = tmp_path_factory.mktemp("tiny_saes")
    build_tiny_sae(root)
    return root


@pytest.fixture(scope="session")
def tiny_sae_dir(tiny_sae_root: Path) -> Path:
    """The SAE folder ``<root>/unet.up_blocks.1.attentions.1`` (``cfg.json`` + ``sae.safetensors``)."""
    from ddr_core.tiny_model import TINY_TARGET_LAYER

    return tiny_sae_root / f"unet.{TINY_TARGET_LAYER}"


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir: Path):
    """The tiny pipeline loaded on CPU in float32 (shared: tests must not leave hooks or change weights)."""
    from ddr_core.pipeline import load_pipeline

    return load_pipeline(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory: pytest.TempPathFactory):
    """``(data_root, instance, metadata by (asset, partition))`` of the whole graph on the tiny model."""
    import dagster as dg

    from tests.tiny_graph import build_tiny_graph

    data_root = tmp_path_factory.mktemp("tiny_graph")
    instance = dg.DagsterInstance.ephemeral()
    return build_tiny_graph(data_root, instance)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: the tiny model's ops are overhead-bound, and one thread avoids
    oversubscription on a busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
