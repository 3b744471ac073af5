from pathlib import Path

import pytest
import yaml

from ddr_core.config import DEFAULT_CONFIG_PATH, ConfigError, load_project_config
from ddr_core.paths import DataLayout, UnsafePathError, resolve_inside


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ddr.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def test_default_config_declares_toy_tiny_and_thesis_variants():
    cfg = load_project_config()
    assert {"tiny-raw", "tiny-sae"} <= set(cfg.variants)  # random tiny model: the unit tests
    assert {"sd14-raw", "style50-raw", "style50-sae"} <= set(cfg.variants)
    assert cfg.layer_of("style50-sae") == "up_blocks.1.attentions.1"
    groups = cfg.capture_groups()
    assert groups["tiny"] == ["tiny-raw", "tiny-sae"]  # one generation pass for both tiny variants
    assert cfg.capture_spec("tiny") == ("tiny", "up_blocks.1.attentions.1", "tiny-prompts")


def test_unknown_reference_is_named(tmp_path):
    data = _base()
    data["variants"]["tiny-sae"]["sae"] = "nope"
    with pytest.raises(ConfigError, match=r"variants.tiny-sae.sae.*unknown SAE 'nope'"):
        load_project_config(_write(tmp_path, data))


def test_block_size_must_be_positive(tmp_path):
    data = _base()
    data["variants"]["tiny-raw"]["block_size"] = 0
    with pytest.raises(ConfigError, match=r"variants.tiny-raw.block_size"):
        load_project_config(_write(tmp_path, data))


def test_capture_group_mixing_layers_is_rejected(tmp_path):
    data = _base()
    data["variants"]["tiny-sae"]["layer"] = "up_blocks.2.attentions.0"
    with pytest.raises(ConfigError, match=r"capture group 'tiny' mixes"):
        load_project_config(_write(tmp_path, data))
    data["variants"]["tiny-sae"]["capture"] = "tiny-up2"
    cfg = load_project_config(_write(tmp_path, data))
    assert set(cfg.capture_groups()) >= {"tiny", "tiny-up2"}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_project_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_project_config(bad)


def test_experiment_env_override(monkeypatch):
    monkeypatch.setenv("DDR_EXPERIMENT", "sweep-1")
    assert load_project_config().experiment == "sweep-1"


def test_layout_namespaces_outputs_by_experiment(tmp_path):
    a = DataLayout(tmp_path, "a")
    b = DataLayout(tmp_path, "b")
    assert a.activations_dir("tiny") != b.activations_dir("tiny")
    assert a.model_dir("tiny") == b.model_dir("tiny")  # inputs are shared
    with pytest.raises(ValueError, match="not a safe folder name"):
        DataLayout(tmp_path, "../escape")


def test_resolve_inside_refuses_escape(tmp_path):
    assert resolve_inside(tmp_path, "x/y.png") == (tmp_path / "x/y.png").resolve()
    for bad in ("../etc/passwd", "/etc/passwd", "x/../../etc"):
        with pytest.raises(UnsafePathError):
            resolve_inside(tmp_path, bad)


def test_toy_world_entries_and_labelled_variants():
    from ddr_core.config import PROJECT_ROOT

    cfg = load_project_config()
    assert cfg.labelled_variants() == ["toy-raw", "toy-sae"]
    assert cfg.capture_groups()["toy-world"] == ["toy-raw", "toy-sae"]
    assert cfg.variants["toy-raw"].width == 64 and cfg.variants["toy-sae"].width == 256
    assert cfg.variants["toy-sae"].channel_blocks()[-1] == (192, 255)
    assert cfg.models["toy-world"].concept_classifier == "concept_classifier"
    assert cfg.models["toy-world"].source.local == str(PROJECT_ROOT / "models" / "toy-world")  # anchored
    assert cfg.prompt_datasets["toy-world-prompts"].labels.families == ["colour", "shape"]
    assert cfg.default_variants == ["toy-raw", "toy-sae"]  # the demo runs the trained toy world


def test_toy_raw_width_matches_the_toy_architecture():
    from ddr_core.toy_training import ToyModelConfig

    widths = ToyModelConfig().unet_block_out_channels
    assert load_project_config().variants["toy-raw"].width == widths[::-1][1]  # up_blocks.1 of 3 levels


def test_local_source_paths_are_anchored_at_the_project_root(tmp_path):
    from ddr_core.config import PROJECT_ROOT

    data = _base()
    data["models"]["tiny"]["source"] = {"local": "some/folder"}
    data["saes"]["tiny-sae"]["source"] = {"local": str(tmp_path / "sae")}
    cfg = load_project_config(_write(tmp_path, data))
    assert cfg.models["tiny"].source.local == str(PROJECT_ROOT / "some" / "folder")
    assert cfg.saes["tiny-sae"].source.local == str(tmp_path / "sae")


def test_label_and_classifier_fields_are_validated(tmp_path):
    data = _base()
    data["prompt_datasets"]["unlearn-canvas"]["labels"] = {"families": ["style"]}
    data["prompt_datasets"]["unlearn-canvas"]["file"] = "prompts.txt"
    with pytest.raises(ConfigError, match=r"prompt_datasets.unlearn-canvas.*not JSONL"):
        load_project_config(_write(tmp_path, data))
    data = _base()
    data["prompt_datasets"]["tiny-prompts"]["labels"] = {"families": ["colour", "size"], "parser": "toy-world"}
    with pytest.raises(ConfigError, match=r"parser 'toy-world' gives the families"):
        load_project_config(_write(tmp_path, data))
    data = _base()
    data["prompt_datasets"]["tiny-prompts"]["labels"] = {"families": ["colour"], "parser": "nope"}
    with pytest.raises(ConfigError, match=r"prompt_datasets.tiny-prompts.labels.parser"):
        load_project_config(_write(tmp_path, data))
    data = _base()
    data["models"]["toy-world"]["concept_classifier"] = "../elsewhere"
    with pytest.raises(ConfigError, match=r"models.toy-world.concept_classifier.*relative path inside"):
        load_project_config(_write(tmp_path, data))
    data = _base()
    data["prompt_datasets"]["tiny-prompts"]["labels"] = {"families": ["colour", "shape"], "parser": "toy-world"}
    assert "tiny-raw" in load_project_config(_write(tmp_path, data)).labelled_variants()
