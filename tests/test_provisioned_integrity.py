"""Provisioned models and SAEs are checked against their manifests where they are loaded, and a change of
their content moves the data versions of what is computed from them.

Faults this guards against: weights changed on disk after provisioning were loaded unchecked (a flipped byte,
a file added beside the weights, a missing config), and a model re-provisioned outside the ``models`` asset
(SAE training provisions it too) left the capture's lineage and data version unchanged and let a capture
store mix batches made with the old weights into the new ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from ddr_core.paths import DataLayout
from ddr_core.pipeline import ModelFolderError, load_pipeline
from ddr_core.provisioning import MANIFEST_NAME, LocalSource, provision, read_manifest
from ddr_core.sae import SaeFormatError, find_sae_folder
from ddr_core.tiny_model import TINY_TARGET_LAYER

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
REPROVISION = r"dagster asset materialize -m dagster_project\.definitions --select models --partition tiny"


def check_provisioned_model(model_dir: Path) -> str | None:
    """:func:`ddr_core.pipeline.check_provisioned_model` (imported here, so each test fails on its own)."""
    from ddr_core.pipeline import check_provisioned_model as check

    return check(model_dir)


def flip_byte(path: Path, offset: int = -100) -> None:
    """Change one byte of ``path`` in place, keeping its size (its modification time moves)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def provisioned_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model provisioned (copied, with a manifest) into a data root as model ``tiny``."""
    dest = DataLayout(tmp_path / "data").model_dir("tiny")
    provision(LocalSource(tiny_model_dir), dest)
    return dest


def test_a_weight_changed_after_provisioning_fails_loading_naming_it_until_reprovisioned(
    provisioned_model: Path, tiny_model_dir: Path
) -> None:
    dest = provisioned_model
    flip_byte(dest / UNET_WEIGHTS)  # same size: only the content (and the file's time) tells
    with pytest.raises(ModelFolderError, match=rf"{UNET_WEIGHTS}: changed on disk.*{REPROVISION}"):
        load_pipeline(dest)

    again = provision(LocalSource(tiny_model_dir), dest)  # the fix the message names (here without Dagster)
    assert again.refetched == [UNET_WEIGHTS]
    assert load_pipeline(dest).unet is not None
    manifest = read_manifest(dest)
    assert manifest is not None and all("mtime_ns" in entry for entry in manifest["files"].values())
    assert check_provisioned_model(dest) == manifest["content_hash"]


def test_missing_added_and_replaced_files_are_named(provisioned_model: Path, tiny_model_dir: Path) -> None:
    dest = provisioned_model
    (dest / "vae" / "config.json").unlink()
    (dest / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"\x00" * 64)
    (dest / "text_encoder" / "model.safetensors").unlink()
    (dest / "text_encoder" / "model.safetensors").symlink_to(tiny_model_dir / "text_encoder" / "model.safetensors")
    with pytest.raises(ModelFolderError) as error:
        check_provisioned_model(dest)
    message = str(error.value)
    assert "vae/config.json: missing" in message
    assert "unet/diffusion_pytorch_model.fp16.safetensors: not in the manifest" in message
    assert "text_encoder/model.safetensors: replaced by a link" in message
    assert "--partition tiny" in message

    result = provision(LocalSource(tiny_model_dir), dest)  # re-provisioning also removes what was added
    assert not (dest / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists() and not result.skipped
    assert check_provisioned_model(dest) == result.content_hash


def test_a_touched_file_and_an_old_manifest_are_hashed_then_refreshed(
    provisioned_model: Path, tiny_model_dir: Path, caplog
) -> None:
    """A file whose time changed but content did not passes (hashed); so does a version-1 manifest without
    times. Re-provisioning the intact copy records the times, so later loads are stat-only again."""
    import os

    dest = provisioned_model
    manifest = read_manifest(dest)
    assert manifest is not None
    old = {"version": 1, **{k: v for k, v in manifest.items() if k not in ("version", "files")},
           "files": {path: {"size": e["size"], "sha256": e["sha256"]} for path, e in manifest["files"].items()}}
    (dest / MANIFEST_NAME).write_text(json.dumps(old))
    os.utime(dest / "model_index.json", ns=(1, 1))
    with caplog.at_level(logging.WARNING, logger="ddr_core.provisioning"):
        assert check_provisioned_model(dest) == manifest["content_hash"]
    assert "same content" in caplog.text and "model_index.json" in caplog.text
    flip_byte(dest / UNET_WEIGHTS)
    with pytest.raises(ModelFolderError, match=rf"{UNET_WEIGHTS}: changed on disk"):
        check_provisioned_model(dest)

    messages: list[str] = []
    provision(LocalSource(tiny_model_dir), dest, progress=messages.append)
    refreshed = read_manifest(dest)
    assert refreshed is not None and refreshed["version"] == 2
    assert all(e["mtime_ns"] == (dest / p).stat().st_mtime_ns for p, e in refreshed["files"].items())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddr_core.provisioning"):
        assert check_provisioned_model(dest) == manifest["content_hash"]
    assert "same content" not in caplog.text


def test_a_damaged_manifest_is_an_error_and_provisioning_repairs_it(
    provisioned_model: Path, tiny_model_dir: Path
) -> None:
    """A manifest whose entries are not objects (a JSON list, a string size) used to raise AttributeError /
    TypeError inside provisioning; now loading names the damaged manifest, and provisioning starts over."""
    dest = provisioned_model
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    manifest["files"][UNET_WEIGHTS] = [1, 2]
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=rf"manifest {MANIFEST_NAME} is damaged.*{REPROVISION}"):
        check_provisioned_model(dest)
    result = provision(LocalSource(tiny_model_dir), dest)
    assert check_provisioned_model(dest) == result.content_hash


def test_a_changed_sae_fails_loading_naming_it(tiny_sae_root: Path, tmp_path: Path) -> None:
    dest = DataLayout(tmp_path / "data").sae_dir("tiny-sae")
    provision(LocalSource(tiny_sae_root), dest)
    assert find_sae_folder(dest, TINY_TARGET_LAYER).is_dir()
    flip_byte(dest / f"unet.{TINY_TARGET_LAYER}" / "sae.safetensors")
    with pytest.raises(SaeFormatError, match=rf"unet\.{TINY_TARGET_LAYER}/sae\.safetensors: changed on disk.*"
                                             r"--select saes --partition tiny-sae"):
        find_sae_folder(dest, TINY_TARGET_LAYER)


def test_a_folder_without_manifest_loads_with_one_warning(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    """Folders nobody provisioned (the tiny model tests build, a folder copied by hand) have nothing to be
    checked against: they load, with one warning per folder."""
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "by-hand"))
    with caplog.at_level(logging.WARNING, logger="ddr_core.provisioning"):
        assert check_provisioned_model(copy) is None
        assert check_provisioned_model(copy) is None
    assert caplog.text.count("has no provisioning manifest") == 1


# ---- data versions follow the content -----------------------------------------------------------------


def _tiny_config_with_local_model(tmp_path: Path, source: Path, monkeypatch) -> None:
    """DDR_CONFIG: the shipped config with model ``tiny`` taken from the local folder ``source``."""
    import yaml

    from ddr_core.config import DEFAULT_CONFIG_PATH

    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    data["models"]["tiny"]["source"] = {"local": str(source)}
    path = tmp_path / "ddr.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setenv("DDR_CONFIG", str(path))


def _data_version(result) -> str:
    return result.get_asset_materialization_events()[0].materialization.tags["dagster/data_version"]


def test_provisioned_model_data_version_follows_the_source_weights(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import dagster as dg

    from tests.tiny_graph import materialize, metadata

    source = Path(shutil.copytree(tiny_model_dir, tmp_path / "src"))
    _tiny_config_with_local_model(tmp_path, source, monkeypatch)
    instance = dg.DagsterInstance.ephemeral()
    first = materialize("models", "tiny", tmp_path / "data", instance)
    assert first.success
    flip_byte(source / UNET_WEIGHTS)
    second = materialize("models", "tiny", tmp_path / "data", instance)
    assert second.success and metadata(second, "models")["refetched_files"] == [UNET_WEIGHTS]
    assert _data_version(second) != _data_version(first)
    dest = DataLayout(tmp_path / "data").model_dir("tiny")
    assert _data_version(second) == check_provisioned_model(dest)
    third = materialize("models", "tiny", tmp_path / "data", instance)
    assert metadata(third, "models")["skipped_intact_copy"] and _data_version(third) == _data_version(second)


def test_capture_records_the_weights_it_loaded_and_never_mixes_old_batches(tmp_path: Path) -> None:
    """The model is re-provisioned with other weights outside the ``models`` asset (as SAE training does):
    the capture store made with the old weights is refused, not resumed; a fresh capture records the
    content hash it loaded as its upstream version, so its data version moves."""
    import dagster as dg

    from ddr_core.records import read_record
    from ddr_core.tiny_model import TinyModelConfig, build_tiny_pipeline
    from ddr_resources.resources import DdrStorage
    from tests.tiny_graph import materialize, step_error

    data_root = tmp_path / "data"
    instance = dg.DagsterInstance.ephemeral()
    capture = {"n_prompts": 2, "batch_size": 2, "num_inference_steps": 2, "seed": 1}
    for name, key, config in [("models", "tiny", None), ("saes", "tiny-sae", None),
                              ("prompt_datasets", "tiny-prompts", None), ("activations", "tiny", capture)]:
        result = materialize(name, key, data_root, instance, config)
        assert result.success, step_error(result)
    first = _data_version(result)
    layout = DdrStorage(data_root=str(data_root)).layout
    model_record = read_record(layout.provisioning_records_dir, "models", "tiny")["data_version"]
    assert read_record(layout.records_dir, "activations", "tiny")["upstream"]["models/tiny"] == model_record

    other = build_tiny_pipeline(tmp_path / "other-weights", TinyModelConfig(seed=1))
    new_hash = provision(LocalSource(other), layout.model_dir("tiny")).content_hash
    assert new_hash != model_record

    stale = materialize("activations", "tiny", data_root, instance, capture)
    assert not stale.success
    assert "different model_version (the model or SAE weights were re-provisioned" in step_error(stale)

    shutil.rmtree(layout.activations_dir("tiny"))
    fresh = materialize("activations", "tiny", data_root, instance, capture)
    assert fresh.success, step_error(fresh)
    record = read_record(layout.records_dir, "activations", "tiny")
    assert record["upstream"]["models/tiny"] == new_hash
    assert record["upstream"]["saes/tiny-sae"] == read_record(layout.provisioning_records_dir, "saes",
                                                              "tiny-sae")["data_version"]
    assert _data_version(fresh) != first


# ---- other JSON files ddr reads beside the weights -----------------------------------------------------


@pytest.mark.parametrize("content", ["[1, 2]", "{oops", '{"asset": "models"}'])
def test_a_record_that_is_not_a_record_names_the_file_and_the_fix(tmp_path: Path, content: str) -> None:
    """A record holding a JSON list (or no data_version) was returned as is and failed later with TypeError."""
    from ddr_core.records import MissingUpstreamError, read_record, record_path

    path = record_path(tmp_path, "models", "tiny")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(MissingUpstreamError, match=r"record .*tiny\.json of asset 'models' partition 'tiny'.*"
                                                   r"materialize models\[tiny\] again"):
        read_record(tmp_path, "models", "tiny")


def test_a_damaged_builtin_marker_rebuilds_instead_of_crashing(tmp_path: Path) -> None:
    from ddr_core import catalog
    from ddr_core.config import SourceConfig

    dest = tmp_path / "prompts"
    source = SourceConfig(builtin="tiny-prompts")
    catalog.provision_source(source, dest)
    (dest / catalog.BUILTIN_MARKER).write_text("{not json")
    rebuilt = catalog.provision_source(source, dest)
    assert json.loads((dest / catalog.BUILTIN_MARKER).read_text())["builtin"] == "tiny-prompts"
    assert rebuilt.n_files == 1

    # an intact builtin copy with a version-1 manifest (no times) gets them when found intact
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    for entry in manifest["files"].values():
        del entry["mtime_ns"]
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert catalog.provision_source(source, dest).skipped
    assert all("mtime_ns" in entry for entry in json.loads((dest / MANIFEST_NAME).read_text())["files"].values())
