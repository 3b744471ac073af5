import re
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
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_project_config(bad)
    assert f'in "{bad}", line 1' in str(error.value)  # YAML's own position names the file


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
    assert cfg.labelled_variants() == ["toy-raw", "toy-sae", "toy-rich-raw", "toy-rich-sae", "toy-noyellow-raw",
                                       "toy-seed1-raw"]
    assert cfg.capture_groups()["toy-world"] == ["toy-raw", "toy-sae"]
    assert cfg.capture_groups()["toy-world-no-yellow"] == ["toy-noyellow-raw"]  # docs/MATCHING.md
    assert cfg.capture_groups()["toy-world-rich"] == ["toy-rich-raw", "toy-rich-sae"]  # docs/TOY_WORLD.md
    assert cfg.models["toy-world-rich"].world == "toy-world-rich"
    assert cfg.prompt_datasets["toy-world-rich-prompts"].labels.families == [
        "colour", "shape", "background", "size", "position"]
    assert cfg.variants["toy-raw"].width == 64 and cfg.variants["toy-sae"].width == 256
    assert cfg.variants["toy-sae"].channel_blocks()[-1] == (192, 255)
    assert cfg.models["toy-world"].concept_classifier == "concept_classifier"
    assert cfg.models["toy-world"].source.local == str(PROJECT_ROOT / "models" / "toy-world")  # anchored
    assert cfg.prompt_datasets["toy-world-prompts"].labels.families == ["colour", "shape", "background"]
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


# --- one naming rule for every name that becomes a folder or a partition key ----------------------------

HOSTILE_NAMES = ["/tmp/x", "../x", "a/b", "a:b", ".", "..", "", "x\n", "a" * 101, "a...b", "Tiny", "a b"]


def _rename(section: str, old: str):
    def apply(data: dict, bad: str) -> None:
        data[section][bad] = data[section].pop(old)
    return apply


def _set(*keys: str):
    def apply(data: dict, bad: str) -> None:
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = bad
    return apply


NAME_FIELDS = {  # kind -> (how to put the hostile name in the config, the field the error must name)
    "model": (_rename("models", "sd-v1-4"), "models name"),
    "sae": (_rename("saes", "saeuron"), "saes name"),
    "prompt dataset": (_rename("prompt_datasets", "unlearn-canvas"), "prompt_datasets name"),
    "variant": (_rename("variants", "sd14-raw"), "variants name"),
    "capture group": (_set("variants", "tiny-raw", "capture"), "variants.tiny-raw.capture"),
    "variant layer": (_set("variants", "tiny-raw", "layer"), "variants.tiny-raw.layer"),
    "model default_layer": (_set("models", "tiny", "default_layer"), "models.tiny.default_layer"),
    "experiment": (_set("experiment"), "experiment"),
}


@pytest.mark.parametrize("bad", HOSTILE_NAMES, ids=repr)
@pytest.mark.parametrize("kind", sorted(NAME_FIELDS))
def test_every_name_that_becomes_a_path_is_checked_at_load(tmp_path, kind, bad):
    """Names become folders (``activations/<capture>``, ``assets/models/<model>``, ``unet.<layer>``) and
    partition keys (``<variant>:<first>-<last>``): a hostile one is refused when the config is loaded, the
    error naming the field, the value, the file and the allowed form."""
    from ddr_core.paths import NAME_RULE

    put, field = NAME_FIELDS[kind]
    data = _base()
    put(data, bad)
    path = _write(tmp_path, data)
    assert yaml.safe_load(path.read_text()) == data  # the hostile value survives the YAML round trip
    with pytest.raises(ConfigError) as error:
        load_project_config(path)
    message = str(error.value)
    assert str(path) in message and field in message and NAME_RULE in message, message
    assert (repr(bad) if len(bad) < 40 else "(101 characters)") in message, message


def test_experiment_from_the_environment_follows_the_same_rule(monkeypatch):
    for bad in ("../x", "/tmp/x", "x\n", "a:b", "a" * 101):
        monkeypatch.setenv("DDR_EXPERIMENT", bad)
        with pytest.raises(ConfigError, match=r"DDR_EXPERIMENT.*not a safe folder name"):
            load_project_config()


def test_good_names_still_load(tmp_path):
    data = _base()
    data["variants"]["tiny-raw"]["capture"] = "tiny.raw_only-1"
    data["experiment"] = "run_2.a-b"
    cfg = load_project_config(_write(tmp_path, data))
    assert cfg.capture_of("tiny-raw") == "tiny.raw_only-1" and cfg.experiment == "run_2.a-b"


def test_overrides_name_known_stages_only(tmp_path):
    data = _base()
    data["variants"]["tiny-sae"]["overrides"]["../dreams"] = {"num_steps": 2}
    with pytest.raises(ConfigError, match=r"variants.tiny-sae.overrides.*unknown stage.*\['timestep_stats', 'priors', 'dreams'\]"):
        load_project_config(_write(tmp_path, data))


@pytest.mark.parametrize("bad", ["/tmp/x", "../x", "a/b", "a:b", ".", "..", "", "x\n", "a" * 101])
def test_layout_refuses_unsafe_names_even_from_a_config_built_in_code(tmp_path, bad):
    """Defence in depth: a ProjectConfig copied with ``model_copy(update=...)`` (not validated) still cannot
    point a layout path outside the data root."""
    layout = DataLayout(tmp_path)
    for make in (layout.model_dir, layout.sae_dir, layout.prompts_dir, layout.activations_dir,
                 layout.timestep_stats_dir, layout.activity_plots_dir, lambda name: layout.stage_dir("dreams", name),
                 lambda name: layout.stage_dir(name, "tiny-raw")):
        with pytest.raises(UnsafePathError, match="not a safe folder name"):
            make(bad)


def test_records_stay_in_their_folder(tmp_path):
    from ddr_core.records import record_path

    assert record_path(tmp_path, "dreams", "tiny-raw:0-15") == tmp_path / "dreams" / "tiny-raw:0-15.json"
    assert record_path(tmp_path, "dream_sweeps", "tiny-raw:tv") == tmp_path / "dream_sweeps" / "tiny-raw:tv.json"
    for asset, partition in (("dreams", "../../x"), ("dreams", "/tmp/x"), ("../x", "tiny-raw"), ("dreams", "x\n")):
        with pytest.raises(UnsafePathError):
            record_path(tmp_path, asset, partition)


# --- files named inside provisioned folders -----------------------------------------------------------

FILE_FIELDS = {
    "prompt file": (("prompt_datasets", "tiny-prompts", "file"), "prompt_datasets.tiny-prompts.file"),
    "concept classifier": (("models", "toy-world", "concept_classifier"), "models.toy-world.concept_classifier"),
    "gdrive filename": (("prompt_datasets", "unlearn-canvas", "source", "gdrive", "filename"),
                        "prompt_datasets.unlearn-canvas.source.gdrive.filename"),
}


@pytest.mark.parametrize("bad", ["/etc/passwd", "../other/prompts.jsonl", "a/../../b.jsonl", "", ".", "a\\..\\b",
                                 "x\n.jsonl"], ids=repr)
@pytest.mark.parametrize("kind", sorted(FILE_FIELDS))
def test_files_named_by_the_config_stay_inside_their_folder(tmp_path, kind, bad):
    keys, field = FILE_FIELDS[kind]
    data = _base()
    _set(*keys)(data, bad)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        load_project_config(path)
    message = str(error.value)
    assert str(path) in message and field in message and "relative path inside the provisioned folder" in message


def test_file_inside_refuses_a_link_out_of_the_folder(tmp_path):
    from ddr_core.paths import file_inside

    folder, outside = tmp_path / "prompts" / "p", tmp_path / "outside"
    folder.mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    (folder / "prompts.jsonl").symlink_to(outside / "secret.jsonl")
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    (folder / "real.jsonl").write_text('{"text": "a"}\n')
    assert file_inside(folder, "real.jsonl", "file") == (folder / "real.jsonl").resolve()
    for relative in ("prompts.jsonl", "sub/secret.jsonl", "sub"):
        with pytest.raises(UnsafePathError, match=r"prompt_datasets.p.file .*leads outside"):
            file_inside(folder, relative, "prompt_datasets.p.file")


# --- input errors caught at load, naming the file, the field, its line and the fix -------------------------


def _edit(tmp_path: Path, old: str, new: str) -> Path:
    """The shipped config with one text edit (keeps its layout, so line numbers are meaningful)."""
    text = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    assert old in text, old
    path = tmp_path / "ddr.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def _line_of(path: Path, fragment: str, occurrence: int = 1) -> int:
    lines = [number for number, line in enumerate(path.read_text().splitlines(), start=1) if fragment in line]
    return lines[occurrence - 1]


def test_a_key_written_twice_is_refused_naming_the_key_and_both_lines(tmp_path):
    path = _edit(tmp_path, "    width: 64\n    block_size: 16\n", "    width: 64\n    block_size: 16\n    width: 32\n")
    first, second = _line_of(path, "width: 64"), _line_of(path, "width: 32")
    with pytest.raises(ConfigError) as error:
        load_project_config(path)
    assert str(error.value) == (f"{path}: key 'width' appears twice in variants.tiny-raw (lines {first} and "
                                f"{second}); YAML would silently keep the second: delete one of them")
    top = tmp_path / "top.yaml"
    top.write_text(DEFAULT_CONFIG_PATH.read_text() + "\nexperiment: other\n")
    with pytest.raises(ConfigError, match=r"key 'experiment' appears twice in \(top level\)"):
        load_project_config(top)


def test_a_merge_key_may_still_be_overridden(tmp_path):
    """``<<: *base`` then the same key is YAML's way to override a shared block, not a repeated key."""
    path = _edit(tmp_path, "  tiny-raw:\n    model: tiny\n    basis: raw\n    prompts: tiny-prompts\n"
                           "    width: 64\n    block_size: 16\n",
                 "  tiny-raw: &raw\n    model: tiny\n    basis: raw\n    prompts: tiny-prompts\n"
                 "    width: 64\n    block_size: 16\n"
                 "  tiny-raw-2:\n    <<: *raw\n    width: 32\n    capture: tiny-2\n")
    cfg = load_project_config(path)
    assert cfg.variants["tiny-raw-2"].width == 32 and cfg.variants["tiny-raw-2"].block_size == 16


@pytest.mark.parametrize(("old", "new", "field", "got"), [
    ("    width: 64\n", "    width: true\n", "variants.tiny-raw.width", "True, a bool"),
    ("    width: 64\n", "    width: '64'\n", "variants.tiny-raw.width", "'64', a str"),
    ("    width: 64\n", "    width: 64.0\n", "variants.tiny-raw.width", "64.0, a float"),
    ("    block_size: 16\n", "    block_size: false\n", "variants.tiny-raw.block_size", "False, a bool"),
    ("        revision: main\n", "        revision: 1.4\n", "models.sd-v1-4.source.hub.revision", "1.4, a float"),
    ("experiment: default", "experiment: 2024", "experiment", "2024, an int"),
], ids=["width-true", "width-str", "width-float", "block-false", "revision-float", "experiment-int"])
def test_values_of_the_wrong_type_are_refused_not_coerced(tmp_path, old, new, field, got):
    path = _edit(tmp_path, old, new)
    with pytest.raises(ConfigError) as error:
        load_project_config(path)
    message = str(error.value)
    line = _line_of(path, new.strip())
    assert f"  {path}:{line}: {field}: " in message and f"(got {got}; write " in message, message


EMPTY_OR_BAD_SIZE = [
    (("prompt_datasets", "unlearn-canvas", "text_field"), "", "prompt_datasets.unlearn-canvas.text_field",
     "text_field is empty; name the JSON field"),
    (("prompt_datasets", "unlearn-canvas", "text_field"), "  ", "prompt_datasets.unlearn-canvas.text_field",
     "text_field is empty"),
    (("models", "sd-v1-4", "source", "hub", "repo_id"), "", "models.sd-v1-4.source.hub.repo_id", "repo_id is empty"),
    (("models", "sd-v1-4", "source", "hub", "revision"), "", "models.sd-v1-4.source.hub.revision",
     "revision is empty"),
    (("models", "sd-v1-4", "source", "hub", "allow_patterns"), [], "models.sd-v1-4.source.hub.allow_patterns",
     "allow_patterns is an empty list"),
    (("models", "sd-v1-4", "source", "hub", "allow_patterns"), ["unet/*", ""],
     "models.sd-v1-4.source.hub.allow_patterns", "allow_patterns[1] is empty"),
    (("models", "style50", "source", "gdrive", "folder_id"), "", "models.style50.source.gdrive.folder_id",
     "folder_id is empty"),
    (("prompt_datasets", "toy-world-prompts", "labels", "families"), ["colour", ""],
     "prompt_datasets.toy-world-prompts.labels", "families[1] is empty"),
    (("prompt_datasets", "toy-world-prompts", "labels", "families"), ["colour", "text"],
     "prompt_datasets.toy-world-prompts", "labels.families includes the text field 'text'"),
    (("variants", "tiny-raw", "sae"), "", "variants.tiny-raw", "basis 'raw' takes no `sae`"),
    (("variants", "tiny-raw", "layer"), "", "variants.tiny-raw.layer", "not a safe folder name"),
    (("models", "tiny", "default_layer"), "", "models.tiny.default_layer", "not a safe folder name"),
    (("variants", "tiny-raw", "width"), -64, "variants.tiny-raw.width", "width must be >= 1"),
    (("variants", "tiny-raw", "block_size"), -1, "variants.tiny-raw.block_size", "block_size must be >= 1"),
]


@pytest.mark.parametrize(("keys", "bad", "field", "says"), EMPTY_OR_BAD_SIZE,
                         ids=[f"{keys[-1]}={bad!r}" for keys, bad, _, _ in EMPTY_OR_BAD_SIZE])
def test_empty_names_and_sizes_are_refused_at_load(tmp_path, keys, bad, field, says):
    data = _base()
    _set(*keys)(data, bad)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        load_project_config(path)
    message = str(error.value)
    assert re.search(rf"  {re.escape(str(path))}:\d+: {re.escape(field)}: .*{re.escape(says)}", message), message


def test_a_variant_with_too_many_channel_blocks_is_refused(tmp_path):
    path = _edit(tmp_path, "    width: 64\n    block_size: 16\n", "    width: 1000000\n    block_size: 1\n")
    with pytest.raises(ConfigError, match=r"ddr\.yaml:\d+: variants\.tiny-raw: width 1000000 / block_size 1 makes "
                                          r"1000000 channel-range partitions, more than 10000; raise block_size to "
                                          r"at least 100"):
        load_project_config(path)


def test_a_misspelt_field_names_the_nearest_known_one(tmp_path):
    path = _edit(tmp_path, "    block_size: 16\n", "    block_sise: 16\n")
    with pytest.raises(ConfigError, match=rf"ddr\.yaml:{_line_of(path, 'block_sise')}: variants\.tiny-raw\.block_sise: "
                                          r"unknown field 'block_sise' \(did you mean 'block_size'\?\)"):
        load_project_config(path)


@pytest.mark.parametrize(("old", "new", "says"), [
    ("priors: {steer_strength_scale: 15.0}", "priors: {steer_strenght_scale: 15.0}",
     "priors.steer_strenght_scale: priors has no parameter 'steer_strenght_scale' "
     "(did you mean 'steer_strength_scale'?)"),
    ("learning_rate: 0.02}", "learning_rate: '0.02'}",
     "dreams.learning_rate: Input should be a valid number (got '0.02', a str; write a number"),
    ("learning_rate: 0.02}", "learning_rate: -1.0}", "dreams.learning_rate: Input should be greater than 0"),
    ("gradient_smoothing_kernel_size: 3,", "gradient_smoothing_kernel_size: 4,",
     "dreams.gradient_smoothing_kernel_size: gradient_smoothing_kernel_size must be odd, got 4"),
    ("priors: {steer_strength_scale: 15.0}", "priors: {steer_strength_scale: 15.0, timesteps: some}",
     "priors.timesteps: Input should be 'active_timesteps', 'all_timesteps', 'activity_peaks' or 'activity_window'"),
], ids=["misspelt", "quoted-number", "out-of-range", "cross-check", "literal"])
def test_variant_overrides_are_validated_at_load_against_the_stage_config(tmp_path, old, new, says):
    """A misspelt or invalid ``variants.<v>.overrides.<stage>`` value used to pass ``dagster definitions
    validate`` and fail only when the stage ran, naming neither the variant nor the file."""
    path = _edit(tmp_path, old, new)
    with pytest.raises(ConfigError) as error:
        load_project_config(path)
    message = str(error.value)
    line = _line_of(path, new)
    assert f"{path}: invalid configuration\n  {path}:{line}: variants.toy-raw.overrides: {says}" in message, message


def test_overrides_keep_the_shipped_values_and_rules_between_fields_are_left_to_the_run(tmp_path):
    cfg = load_project_config()
    assert cfg.variants["toy-sae"].overrides["dreams"]["learning_rate"] == 0.02
    # n_results 10 with use_prior false needs 10 seeds: a run may give them, so the load does not refuse it
    path = _edit(tmp_path, "priors: {steer_strength_scale: 15.0}\n      dreams: {",
                 "priors: {steer_strength_scale: 15.0}\n      dreams: {n_results: 10, use_prior: false, ")
    assert load_project_config(path).variants["toy-raw"].overrides["dreams"]["n_results"] == 10


def test_hostile_yaml_is_refused_without_exhausting_memory_or_the_stack(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]" for previous, name in zip("abcdefg", "bcdefgh", strict=True)]
    bomb.write_text("\n".join(levels) + "\n")  # 10**8 values once expanded
    with pytest.raises(ConfigError, match=r"bomb.yaml: more than 100000 values \(counting through aliases\)"):
        load_project_config(bomb)
    deep = tmp_path / "deep.yaml"
    deep.write_text("models: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.yaml: not valid YAML: nested too deeply"):
        load_project_config(deep)
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as handle:
        handle.truncate(2 << 20)
    with pytest.raises(ConfigError, match=r"huge.yaml: 2097152 bytes, more than the 1048576"):
        load_project_config(huge)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"experiment: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 \(byte 0xe9 on line 1\)"):
        load_project_config(latin1)
