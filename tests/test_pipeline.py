"""Loading local model folders, layer addressing, initial latents."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ddr_core.families import as_model
from ddr_core.pipeline import (
    LayerNotFoundError,
    ModelFolderError,
    load_pipeline,
    resolve_layer,
)
from ddr_core.tiny_model import TINY_TARGET_LAYER


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_load_pipeline(tiny_pipe):
    assert tiny_pipe.unet.device.type == "cpu" and tiny_pipe.unet.dtype == torch.float32
    assert tiny_pipe.safety_checker is None and tiny_pipe.feature_extractor is None
    assert tiny_pipe._progress_bar_config.get("disable") is True
    assert not tiny_pipe.unet.training


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_folder(model_copy: Path, component: str):
    shutil.rmtree(model_copy / component)
    with pytest.raises(ModelFolderError, match=rf"'{component}'.*Re-provision"):
        load_pipeline(model_copy)


def test_missing_weights_file(model_copy: Path):
    (model_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"'vae' .* no \*\.safetensors"):
        load_pipeline(model_copy)


def test_missing_model_index_and_folder(model_copy: Path, tmp_path: Path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")
    (model_copy / "model_index.json").unlink()
    with pytest.raises(ModelFolderError, match="model_index.json"):
        load_pipeline(model_copy)


def test_truncated_safetensors_names_the_file(model_copy: Path):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match=r"diffusion_pytorch_model\.safetensors.*truncated"):
        load_pipeline(model_copy)


def test_garbage_safetensors_names_the_file(model_copy: Path):
    weights = model_copy / "text_encoder" / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFolderError, match=r"model\.safetensors.*corrupt"):
        load_pipeline(model_copy)


def test_resolve_layer(tiny_pipe):
    layer = resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    assert layer is tiny_pipe.unet.up_blocks[1].attentions[1]


def test_unknown_layer_lists_close_names(tiny_pipe):
    with pytest.raises(LayerNotFoundError) as error:
        resolve_layer(tiny_pipe.unet, "up_blocks.1.attention.1")
    assert isinstance(error.value, ValueError)
    assert "up_blocks.1.attentions.1" in str(error.value)
    with pytest.raises(LayerNotFoundError, match="up_blocks"):
        resolve_layer(tiny_pipe.unet, "up_blocks.9")
    with pytest.raises(LayerNotFoundError):
        resolve_layer(tiny_pipe.unet, "")


def test_layer_width(tiny_pipe):
    model = as_model(tiny_pipe)
    assert model.layer_width(TINY_TARGET_LAYER) == 64
    assert model.layer_width("up_blocks.2.attentions.1") == 32
    assert model.layer_width("down_blocks.0.attentions.0") == 32
    assert not tiny_pipe.unet.up_blocks[1].attentions[1]._forward_hooks


def test_initial_latents_depend_only_on_the_seed(tiny_pipe):
    initial_latents = as_model(tiny_pipe).initial_latents
    batch = initial_latents([3, 7, 11], 64, 64, torch.float32, "cpu")
    assert batch.shape == (3, 4, 8, 8)
    alone = initial_latents([7], 64, 64, torch.float32, "cpu")
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[1])
    assert initial_latents([7], 128, 64).shape == (1, 4, 16, 8)
    with pytest.raises(ValueError, match="multiples"):
        initial_latents([0], 60, 64)


def _rewrite_header(weights: Path, header: bytes) -> None:
    """``weights`` with its safetensors header replaced by ``header`` (the data after it kept)."""
    import struct

    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])


@pytest.mark.parametrize("header", [
    b"[1, 2, 3]",  # a JSON list: was AttributeError ('list' object has no attribute 'items')
    b'{"w": [0, 8]}',  # an entry that is not an object: was TypeError
    b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}',  # offsets as strings
    b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}',  # end before start
    b'{"__metadata__": [1], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
])
def test_wrong_typed_safetensors_header_names_the_file_and_the_fix(model_copy: Path, header: bytes):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    _rewrite_header(weights, header)
    with pytest.raises(ModelFolderError, match=r"diffusion_pytorch_model\.safetensors of component 'unet' is "
                                               r"corrupt .*Re-provision"):
        load_pipeline(model_copy)


@pytest.mark.parametrize("relative", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json",
                                      "tokenizer/vocab.json"])
def test_json_config_that_is_not_an_object_names_the_file(model_copy: Path, relative: str):
    """diffusers / transformers fail on these with AttributeError or worse; ddr names the file first."""
    path = model_copy / relative
    if not path.exists():
        pytest.skip(f"the tiny model has no {relative}")
    path.write_text("[1, 2]")
    with pytest.raises(ModelFolderError, match=rf"{relative.split('/')[-1]} holds a JSON list, not an object"
                                               r".*Re-provision"):
        load_pipeline(model_copy)
    path.write_text("{oops")
    with pytest.raises(ModelFolderError, match=rf"{relative.split('/')[-1]} is not valid JSON"):
        load_pipeline(model_copy)
