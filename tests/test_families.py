"""Model families: a diffusers folder is loaded as the family its model_index.json names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ddr_core.families import (
    Conditioning,
    as_model,
    family_class,
    family_of_folder,
    load_model,
)
from ddr_core.families.sd import StableDiffusionFamily
from ddr_core.pipeline import ModelFolderError
from ddr_core.tiny_model import TINY_TARGET_LAYER


def test_the_tiny_folder_is_stable_diffusion(tiny_model_dir: Path, tiny_pipe) -> None:
    assert family_of_folder(tiny_model_dir) is StableDiffusionFamily
    model = load_model(tiny_model_dir)
    assert isinstance(model, StableDiffusionFamily) and model.denoiser is model.pipe.unet
    wrapped = as_model(tiny_pipe)
    assert isinstance(wrapped, StableDiffusionFamily) and wrapped.pipe is tiny_pipe
    assert as_model(wrapped) is wrapped
    assert wrapped.default_size == (64, 64) and wrapped.latent_shape(64, 32) == (4, 8, 4)
    assert wrapped.num_train_timesteps == 1000
    assert wrapped.layer_width(TINY_TARGET_LAYER) == 64


def test_a_pipeline_no_family_loads_is_refused_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=r"KandinskyPipeline.*StableDiffusionPipeline"):
        load_model(folder)
    (folder / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ModelFolderError, match="model_index.json holds a JSON list"):
        family_of_folder(folder)
    with pytest.raises(ValueError, match=r"known families: .*\bsd\b"):
        family_class("nope")


def test_conditioning_repeats_and_expands_along_the_batch() -> None:
    one = Conditioning({"prompt_embeds": torch.arange(6.0).reshape(1, 3, 2), "pooled": torch.ones(1, 4)})
    assert one.batch == 1
    three = one.repeat(3)
    assert three["prompt_embeds"].shape == (3, 3, 2) and three["pooled"].shape == (3, 4)
    view = one.expand(5)
    assert view["prompt_embeds"].shape == (5, 3, 2) and view["prompt_embeds"].data_ptr() == one["prompt_embeds"].data_ptr()


def test_an_unknown_builtin_is_refused_when_the_config_loads() -> None:
    from ddr_core.config import SourceConfig

    with pytest.raises(ValueError, match=r"unknown builtin 'tiny-xl'; known builtins: tiny, .*tiny-prompts, tiny-sae"):
        SourceConfig(builtin="tiny-xl")
    assert SourceConfig(builtin="tiny").describe() == "builtin:tiny"


def test_a_new_sae_kind_is_one_module_and_its_bases_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config, the priors' default scale and load_basis learn a kind from its class alone."""
    from ddr_core.basis import BASES, basis_class
    from ddr_core.config import VariantConfig
    from ddr_core.priors import PriorsConfig

    (tmp_path / "my_sae_kind.py").write_text(
        "import torch\n"
        "from ddr_core.basis import RawChannels\n"
        "class MyBasis(RawChannels):\n"
        "    kind = 'mine'\n"
        "    required_hook = 'residual'\n"
        "    default_steer_scale = 7.0\n"
        "    @classmethod\n"
        "    def load(cls, sae_dir, layer_name, layer_width, device):\n"
        "        return cls(layer_width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BASES, "mine", "my_sae_kind:MyBasis")
    assert basis_class("mine").kind == "mine" and PriorsConfig().resolved_scale("mine") == 7.0
    with pytest.raises(ValueError, match="basis 'mine' reads the block's residual update: set `hook: residual`"):
        VariantConfig(model="m", prompts="p", basis="mine", sae="s", width=4)
    assert VariantConfig(model="m", prompts="p", basis="mine", sae="s", width=4, hook="residual").basis == "mine"
    with pytest.raises(ValueError, match="unknown basis 'nope'; known: raw, sae, sdxl-unbox, mine"):
        VariantConfig(model="m", prompts="p", basis="nope", width=4)
