"""Tests for ddr_core.sae: the SAeUron on-disk format, encoding maths and error reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ddr_core.sae import Sae, SaeConfig, SaeFormatError, find_sae_folder, load_sae, save_sae

# A hand-checkable SAE: d_in=2, num_latents=3, k=2.
ENCODER_WEIGHT = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
ENCODER_BIAS = torch.tensor([0.0, -1.0, 0.5])
W_DEC = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
B_DEC = torch.tensor([0.5, -0.5])


def write_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae.safetensors"))
    return folder


def hand_tensors() -> dict[str, torch.Tensor]:
    return {"encoder.weight": ENCODER_WEIGHT, "encoder.bias": ENCODER_BIAS, "W_dec": W_DEC, "b_dec": B_DEC}


@pytest.fixture
def hand_folder(tmp_path: Path) -> Path:
    # Real SAeUron cfg.json keys, including ones we ignore.
    cfg = {
        "expansion_factor": 0,
        "normalize_decoder": True,
        "num_latents": 3,
        "k": 2,
        "multi_topk": False,
        "skip_connection": False,
        "batch_topk": True,
        "d_in": 2,
    }
    return write_folder(tmp_path / "unet.up_blocks.1.attentions.1", cfg, hand_tensors())


def test_load_and_encode_matches_hand_computation(hand_folder: Path) -> None:
    sae = load_sae(hand_folder, expected_d_in=2)
    assert sae.cfg == SaeConfig(d_in=2, num_latents=3, k=2, normalize_decoder=True, expansion_factor=0)
    x = torch.tensor([[2.5, 1.0], [0.5, -0.5]])
    # x - b_dec = [[2, 1.5], [0, 0]]
    # row 0: [2*1+0, 1.5*2-1, 2-1.5+0.5] = [2, 2, 1]; row 1: relu([0, -1, 0.5]) = [0, 0, 0.5]
    expected = torch.tensor([[2.0, 2.0, 1.0], [0.0, 0.0, 0.5]])
    torch.testing.assert_close(sae.feature_activations(x), expected)


def test_feature_activations_keep_leading_dims() -> None:
    sae = Sae.random(d_in=4, num_latents=12, k=3, seed=1)
    x = torch.randn(2, 5, 7, 4)
    acts = sae.feature_activations(x)
    assert acts.shape == (2, 5, 7, 12)
    torch.testing.assert_close(acts[1, 2, 3], sae.feature_activations(x[1, 2, 3]))
    assert (acts >= 0).all()


def test_topk_and_decode_by_hand(hand_folder: Path) -> None:
    sae = load_sae(hand_folder)
    x = torch.tensor([[2.5, 2.0]])  # x - b_dec = [2, 2.5] -> acts [2, 4, 0]
    values, indices = sae.topk(x)
    torch.testing.assert_close(values, torch.tensor([[4.0, 2.0]]))
    assert indices.tolist() == [[1, 0]]
    # decode: 4*[0,1] + 2*[1,0] + b_dec = [2.5, 3.5]
    torch.testing.assert_close(sae.decode(values, indices), torch.tensor([[2.5, 3.5]]))
    torch.testing.assert_close(sae(x), torch.tensor([[2.5, 3.5]]))


def test_chosen_feature_helpers_agree_with_full_encoder() -> None:
    sae = Sae.random(d_in=6, num_latents=24, k=4, seed=3)
    features = torch.tensor([5, 0, 23])
    x = torch.randn(10, 6)
    weight, bias = sae.encoder_rows(features)
    assert weight.shape == (3, 6) and bias.shape == (3,)
    torch.testing.assert_close(
        torch.relu((x - sae.b_dec) @ weight.T + bias), sae.feature_activations(x)[:, features]
    )
    directions = sae.decoder_directions(features)
    torch.testing.assert_close(directions, sae.W_dec[features])
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(3))
    with pytest.raises(IndexError):
        sae.decoder_directions(torch.tensor([24]))


def test_random_is_deterministic() -> None:
    a = Sae.random(8, 32, 4, seed=7)
    b = Sae.random(8, 32, 4, seed=7)
    c = Sae.random(8, 32, 4, seed=8)
    torch.testing.assert_close(a.encoder.weight, b.encoder.weight)
    torch.testing.assert_close(a.b_dec, b.b_dec)
    assert not torch.equal(a.encoder.weight, c.encoder.weight)


def test_save_load_round_trip(tmp_path: Path) -> None:
    sae = Sae.random(8, 32, 4, seed=2)
    folder = save_sae(sae, tmp_path / "unet.mid_block.attentions.0")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = load_sae(folder, expected_d_in=8)
    assert loaded.cfg == sae.cfg
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), sae(x))
    torch.testing.assert_close(loaded.feature_activations(x), sae.feature_activations(x))


def test_config_expansion_factor_resolves_num_latents() -> None:
    cfg = SaeConfig.from_json_dict({"d_in": 4, "expansion_factor": 3, "num_latents": 0, "k": 2, "extra": 1})
    assert cfg.num_latents == 12 and cfg.expansion_factor == 3 and cfg.normalize_decoder


def test_input_unit_norm_standardises_input() -> None:
    sae = Sae.random(4, 8, 2, seed=0)
    normed = Sae(SaeConfig(d_in=4, num_latents=8, k=2, input_unit_norm=True))
    normed.load_state_dict(sae.state_dict())
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    standardised = (x - x.mean()) / (x - x.mean()).std()
    torch.testing.assert_close(
        normed.feature_activations(x), sae.feature_activations(standardised), atol=1e-4, rtol=1e-4
    )


# ---- errors -----------------------------------------------------------------------------------


def test_missing_weights_file(hand_folder: Path) -> None:
    (hand_folder / "sae.safetensors").unlink()
    with pytest.raises(SaeFormatError, match=r"sae\.safetensors does not exist; re-provision"):
        load_sae(hand_folder)


def test_truncated_weights_file(hand_folder: Path) -> None:
    weights = hand_folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(SaeFormatError, match=r"sae\.safetensors are corrupt or truncated"):
        load_sae(hand_folder)


def test_garbage_weights_file(hand_folder: Path) -> None:
    (hand_folder / "sae.safetensors").write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(SaeFormatError, match="corrupt or truncated"):
        load_sae(hand_folder)


def test_missing_tensor(tmp_path: Path) -> None:
    tensors = hand_tensors()
    del tensors["W_dec"]
    folder = write_folder(tmp_path / "sae", {"d_in": 2, "num_latents": 3, "k": 2}, tensors)
    with pytest.raises(SaeFormatError, match="lack tensor.*W_dec"):
        load_sae(folder)


def test_shape_inconsistent_with_config(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "sae", {"d_in": 2, "num_latents": 4, "k": 2}, hand_tensors())
    with pytest.raises(SaeFormatError, match=r"encoder\.weight has shape \(3, 2\), expected \(4, 2\)"):
        load_sae(folder)


def test_config_missing_fields(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "sae", {"normalize_decoder": True}, hand_tensors())
    with pytest.raises(
        SaeFormatError, match="missing required field.*d_in, k, num_latents or expansion_factor"
    ):
        load_sae(folder)


def test_config_not_json(hand_folder: Path) -> None:
    (hand_folder / "cfg.json").write_text("{not json")
    with pytest.raises(SaeFormatError, match="not valid JSON"):
        load_sae(hand_folder)


def test_d_in_does_not_match_layer_width(hand_folder: Path) -> None:
    with pytest.raises(SaeFormatError, match="d_in=2 but the hooked layer has width 1280"):
        load_sae(hand_folder, expected_d_in=1280)


def test_find_sae_folder_variants(tmp_path: Path) -> None:
    layer = "up_blocks.1.attentions.1"
    sae = Sae.random(4, 8, 2)
    direct = save_sae(sae, tmp_path / "flat" / f"unet.{layer}")
    assert find_sae_folder(tmp_path / "flat", layer) == direct
    assert find_sae_folder(direct, layer) == direct
    nested = save_sae(sae, tmp_path / "nested" / "checkpoint_a" / f"unet.{layer}")
    assert find_sae_folder(tmp_path / "nested", layer) == nested


def test_find_sae_folder_lists_what_exists(tmp_path: Path) -> None:
    save_sae(Sae.random(4, 8, 2), tmp_path / "unet.down_blocks.0.attentions.0")
    with pytest.raises(
        SaeFormatError, match=r"up_blocks\.1\.attentions\.1.*found: unet\.down_blocks\.0\.attentions\.0"
    ):
        find_sae_folder(tmp_path, "up_blocks.1.attentions.1")
    with pytest.raises(SaeFormatError, match="does not exist"):
        find_sae_folder(tmp_path / "nope", "up_blocks.1.attentions.1")


@pytest.mark.parametrize("cfg, problem", [
    ([1, 2], "must hold a JSON object, got list"),
    ({"d_in": 2, "k": 2, "num_latents": "3"}, "'num_latents' must be a whole number, got '3'"),
    ({"d_in": 2, "k": 2, "num_latents": [3]}, r"'num_latents' must be a whole number, got \[3\]"),
    ({"d_in": "2", "k": 2, "num_latents": 3}, "'d_in' must be a whole number, got '2'"),
    ({"d_in": 2, "k": 2, "num_latents": 0, "expansion_factor": "x"}, "'expansion_factor' must be a whole number"),
])
def test_wrong_typed_cfg_json_names_the_file_and_the_fix(tmp_path: Path, cfg, problem: str) -> None:
    """A cfg.json of the wrong shape used to raise TypeError (``'3' % 2``) instead of naming the file."""
    folder = write_folder(tmp_path / "sae", {"d_in": 2, "num_latents": 3, "k": 2}, hand_tensors())
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeFormatError, match=rf"cfg\.json: .*{problem}.*Re-provision the SAE"):
        load_sae(folder)
