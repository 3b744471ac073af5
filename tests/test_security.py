"""Security checks: no unsafe deserialisation, secrets stay out of outputs, safe defaults.

Covered elsewhere (not repeated here): the hub token is sent to the hub only and never appears in
progress messages, logs, errors or manifests (tests/test_provisioning.py::
test_token_sent_to_hub_only_and_never_reported); crafted paths are refused by ``resolve_inside``
(tests/test_config.py::test_resolve_inside_refuses_escape); variant names that are not safe folder
names are refused by the activation store (tests/test_activation_store.py).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("ddr_core", "ddr_resources", "ddr_assets", "dagster_project")

FORBIDDEN = {
    "pickle": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b|\bpickle\.(loads?|dumps?|Unpickler)\b",
                         re.MULTILINE),
    "torch.load": re.compile(r"\btorch\.load\s*\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "np.load(allow_pickle=True)": re.compile(r"allow_pickle\s*=\s*True"),
    "yaml.load (unsafe loader)": re.compile(r"\byaml\.(load|unsafe_load|full_load)\s*\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
}


def _sources() -> list[Path]:
    files = [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    return files


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_no_unsafe_loading_in_the_code(what):
    pattern = FORBIDDEN[what]
    hits = [f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
            for path in _sources() for text in [path.read_text(encoding="utf-8")]
            for m in pattern.finditer(text)]
    assert not hits, f"{what} found in {hits}"


def test_the_scan_would_catch_what_it_forbids():
    samples = {
        "pickle": "import pickle\n", "torch.load": "x = torch.load(path)\n",
        "trust_remote_code=True": "f(trust_remote_code = True)\n",
        "np.load(allow_pickle=True)": "np.load(p, allow_pickle=True)\n",
        "yaml.load (unsafe loader)": "yaml.load(text)\n", "eval/exec": "eval(s)\n",
    }
    assert set(samples) == set(FORBIDDEN)
    for what, sample in samples.items():
        assert FORBIDDEN[what].search(sample), what
    assert not FORBIDDEN["yaml.load (unsafe loader)"].search("yaml.safe_load(text)")
    assert not FORBIDDEN["eval/exec"].search("model.eval()\n")


def test_dot_env_is_ignored_and_the_example_documents_every_variable():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be git-ignored"
    example_tracked = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT)
    assert example_tracked.returncode == 1, ".env.example must not be ignored"
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    assigned = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.MULTILINE))
    for name in ("DDR_DATA_ROOT", "DDR_EXPERIMENT", "DDR_CONFIG", "HF_TOKEN", "HF_ENDPOINT", "DAGSTER_HOME",
                 "DDR_SLURM_HOST", "DDR_SLURM_USER", "DDR_SLURM_KEY_PATH", "DDR_SLURM_PARTITION",
                 "DDR_SLURM_ACCOUNT"):
        assert name in assigned, name
    # every DDR_* variable the code, scripts, Makefile or CI read is documented (internal hand-offs excepted)
    # internal hand-offs: the launcher's guard settings for its own subprocess; a run's id in its processes
    internal = {"DDR_WEB_GUARD", "DDR_DAGSTER_RUN_ID"}
    used = set()
    for folder in ("ddr_core", "ddr_resources", "ddr_assets", "dagster_project", "scripts", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".sh", ""}:
                used |= set(re.findall(r"\bDDR_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8", errors="ignore")))
    used |= set(re.findall(r"\bDDR_[A-Z0-9_]*[A-Z0-9]\b", (ROOT / "Makefile").read_text(encoding="utf-8")))
    assert sorted(used - set(assigned) - internal) == []
    assert assigned["HF_TOKEN"] == "" and assigned["DDR_SLURM_KEY_PATH"] == ""  # no secret in the example


@pytest.mark.parametrize(("target", "service"), [("dev", "dev"), ("inspect", "inspector")])
def test_make_serves_the_guarded_ui_on_loopback_only(target, service):
    """`make dev` / `make inspect` start the UI through the guarded launcher (a bare `dagster dev` or
    `streamlit run` would serve it unguarded), bound to loopback."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe, f"Makefile has no {target} target"
    command = next(line for line in recipe.group(1).splitlines() if "dagster_project.launcher" in line)
    assert re.search(rf"-m dagster_project\.launcher {service}\b", command), command
    assert re.search(r"--host\s+127\.0\.0\.1\b", command), command
    assert "--no-token" not in command
    assert "0.0.0.0" not in makefile
    recipes = "\n".join(line for line in makefile.splitlines() if line.startswith("\t"))
    assert not re.search(r"dagster(-webserver)? dev|dagster-webserver|streamlit run", recipes)


def test_hub_token_never_reaches_records_or_metadata(tmp_path, monkeypatch):
    """Provisioning with HF_TOKEN set: the token is in no record, metadata value or log line."""
    import dagster as dg

    from tests.test_assets import _materialize

    secret = "hf_NeverLogMe_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize("prompt_datasets", "tiny-prompts", tmp_path, instance)
    assert result.success
    seen = [str(event) for event in result.all_events]
    seen += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".json"]
    seen += [str(record) for record in
             instance.fetch_materializations(dg.AssetKey("prompt_datasets"), limit=10).records]
    assert len(seen) > 3 and not any(secret in text for text in seen)


# --- names and files from the configuration never lead outside the data root ----------------------------

def _tiny_data_root(tmp_path: Path, tiny_model_dir: Path):
    """A data root holding the tiny model and the built-in tiny prompts, and the shipped project config."""
    import shutil

    from ddr_core import catalog
    from ddr_core.config import DEFAULT_CONFIG_PATH, load_project_config
    from ddr_core.paths import DataLayout

    project = load_project_config(DEFAULT_CONFIG_PATH)
    layout = DataLayout(tmp_path / "data")
    shutil.copytree(tiny_model_dir, layout.model_dir("tiny"))
    catalog.provision_entry(project, layout, "prompts", "tiny-prompts")
    return project, layout


def _spy_on_model_loading(monkeypatch) -> list:
    """Calls of ``load_model`` (the first GPU work of a capture), passed through unchanged."""
    import ddr_core.families

    calls: list = []
    real = ddr_core.families.load_model

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ddr_core.families, "load_model", spy)
    return calls


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("hostile", ["{outside}", "../../../../{outside_name}", "a/b", "a:b"])
def test_a_capture_group_name_cannot_write_outside_the_data_root(tmp_path, monkeypatch, tiny_model_dir, hostile):
    """A ``capture:`` name that is absolute or climbs with ``..`` is refused when the config loads; a config
    copied in code (``model_copy`` skips validation) is refused by the layout before the model is loaded, and
    nothing is written outside the data root (before the fix: plan, locks, images and batches were)."""
    import torch
    import yaml

    from ddr_core.activations import CaptureConfig, capture_group
    from ddr_core.config import DEFAULT_CONFIG_PATH, ConfigError, load_project_config
    from ddr_core.paths import UnsafePathError

    outside = tmp_path / "outside"
    name = hostile.format(outside=outside, outside_name=outside.name)
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["variants"]["tiny-raw"]["capture"] = name
    config_file = tmp_path / "hostile.yaml"
    config_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("DDR_CONFIG", str(config_file))
    with pytest.raises(ConfigError, match=r"variants.tiny-raw.capture: .*not a safe folder name"):
        load_project_config()

    project, layout = _tiny_data_root(tmp_path, tiny_model_dir)
    if name.startswith("../"):  # the activations folder is 4 levels below the data root's parent
        assert (layout.outputs_dir / "activations" / name).resolve() == outside.resolve()
    variants = dict(project.variants)
    variants["tiny-raw"] = variants["tiny-raw"].model_copy(update={"capture": name})
    hostile_project = project.model_copy(update={"variants": variants})
    assert name in hostile_project.capture_groups()
    loaded = _spy_on_model_loading(monkeypatch)
    before = _files_under(layout.data_root)
    config = CaptureConfig(n_prompts=1, num_images_per_prompt=1, batch_size=1, num_inference_steps=2, seed=0)
    with pytest.raises(UnsafePathError, match="capture group .*not a safe folder name"):
        capture_group(hostile_project, layout, name, config, torch.device("cpu"))
    assert loaded == []  # refused before the model was loaded
    assert not outside.exists() and not (tmp_path / "a").exists()
    assert _files_under(layout.data_root) == before


def test_a_prompt_file_linked_out_of_its_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                                   tiny_model_dir):
    """``prompt_datasets.<p>.file`` names a file inside the provisioned folder; a link there to another file
    must not make that file's content (into the images, tables and metadata) pass for the dataset."""
    import torch

    from ddr_core.activations import CaptureConfig, capture_group
    from ddr_core.paths import UnsafePathError

    project, layout = _tiny_data_root(tmp_path, tiny_model_dir)
    prompt_file = layout.prompts_dir("tiny-prompts") / project.prompt_datasets["tiny-prompts"].file
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "a red circle"}\n')
    prompt_file.unlink()
    prompt_file.symlink_to(secret)
    loaded = _spy_on_model_loading(monkeypatch)
    config = CaptureConfig(n_prompts=1, num_images_per_prompt=1, batch_size=1, num_inference_steps=2, seed=0)
    with pytest.raises(UnsafePathError, match=r"prompt_datasets.tiny-prompts.file 'prompts.jsonl' leads outside"):
        capture_group(project, layout, "tiny", config, torch.device("cpu"))
    assert loaded == []
    assert not layout.activations_dir("tiny").exists()


def test_an_sae_layer_folder_linked_out_of_the_sae_folder_is_refused(tmp_path):
    from ddr_core.paths import UnsafePathError
    from ddr_core.sae import Sae, find_sae_folder, save_sae

    layer = "up_blocks.1.attentions.1"
    outside = save_sae(Sae.random(4, 8, 2), tmp_path / "outside" / f"unet.{layer}")
    root = tmp_path / "saes" / "s"
    root.mkdir(parents=True)
    (root / f"unet.{layer}").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="leads outside"):
        find_sae_folder(root, layer)
    (root / f"unet.{layer}").unlink()
    inside = save_sae(Sae.random(4, 8, 2), root / f"unet.{layer}")
    (inside / "cfg.json").unlink()
    (inside / "cfg.json").symlink_to(outside / "cfg.json")
    with pytest.raises(UnsafePathError, match="leads outside"):
        find_sae_folder(root, layer)
    for bad in ("../../outside/x", "/tmp/x", "x\n"):
        with pytest.raises(UnsafePathError, match="layer .*not a safe folder name"):
            find_sae_folder(root, bad)


def test_sweep_and_store_names_follow_the_same_rule(tmp_path):
    from pydantic import ValidationError

    from ddr_core.activation_store import ActivationStore, ActivationStoreError
    from ddr_core.paths import NAME_RULE, DataLayout, UnsafePathError
    from ddr_core.sweeps import SweepConfig, sweep_dir

    for bad in ("x\n", "a" * 101, "a:b", "../up"):
        with pytest.raises(ValidationError, match="not a safe folder name"):
            SweepConfig(variant="tiny-raw", channels=[0], grid={"learning_rate": [0.1]}, name=bad)
        with pytest.raises(UnsafePathError):
            sweep_dir(DataLayout(tmp_path), bad, "tiny-raw")
        with pytest.raises(UnsafePathError):
            sweep_dir(DataLayout(tmp_path), "sweep", bad)
        with pytest.raises(ActivationStoreError, match=re.escape(NAME_RULE)):
            ActivationStore(tmp_path / "store")._check_variant_name(bad)


def test_a_stage_request_names_only_safe_files():
    """A job's request (read by the job on the cluster) names its report ``_jobs/<invocation_id>.json`` under
    ``outputs/<experiment>``: both follow the one naming rule."""
    from pydantic import ValidationError

    from ddr_core.cluster_payload import StageRequest

    ok = StageRequest(stage="selftest", data_root="/d", experiment="default", invocation_id="0a1b2c")
    assert ok.invocation_id == "0a1b2c"
    for field in ("experiment", "invocation_id"):
        for bad in ("../../x", "/tmp/x", "x\n", "a:b"):
            values = {"experiment": "default", "invocation_id": "0a1b2c", field: bad}
            with pytest.raises(ValidationError, match=f"{field}.*not a safe folder name"):
                StageRequest(stage="selftest", data_root="/d", **values)


@pytest.mark.parametrize("linked", ["prompts.jsonl", "concept_classifier/classifier.safetensors",
                                    "concept_classifier"])
def test_feature_concepts_refuses_prompt_and_classifier_links_out_of_their_folder(tmp_path, linked):
    """The ground-truth labels (prompt file) and the model's concept classifier are read from inside their
    provisioned folders only: a link to another file is refused, not scored as if it were the dataset."""
    import shutil

    import torch

    from ddr_core.concept_classifier import (
        ConceptClassifier,
        ConceptClassifierConfig,
        save_concept_classifier,
    )
    from ddr_core.config import DEFAULT_CONFIG_PATH, load_project_config
    from ddr_core.feature_concepts import feature_concepts_for_variant
    from ddr_core.paths import DataLayout, UnsafePathError
    from tests.test_feature_concepts import write_priors_and_dreams, write_prompts, write_stats

    project = load_project_config(DEFAULT_CONFIG_PATH)
    layout = DataLayout(tmp_path / "data")
    write_stats(layout.timestep_stats_dir("toy-raw"))
    write_prompts(layout.prompts_dir("toy-world-prompts") / "prompts.jsonl")
    torch.manual_seed(0)
    save_concept_classifier(ConceptClassifier(ConceptClassifierConfig(image_size=16, channels=(8,), norm_groups=4)),
                            layout.model_dir("toy-world") / "concept_classifier")
    write_priors_and_dreams(layout.data_root, layout.stage_dir("priors", "toy-raw"),
                            layout.stage_dir("dreams", "toy-raw"))
    folder = layout.prompts_dir("toy-world-prompts") if linked == "prompts.jsonl" else layout.model_dir("toy-world")
    moved = tmp_path / "outside" / linked
    moved.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / linked, moved)
    (folder / linked).symlink_to(moved, target_is_directory=moved.is_dir())
    field = "prompt_datasets.toy-world-prompts.file" if linked == "prompts.jsonl" else \
        "models.toy-world.concept_classifier"
    with pytest.raises(UnsafePathError, match=rf"{re.escape(field)} .*leads outside"):
        feature_concepts_for_variant(project, layout, "toy-raw")
    assert not layout.stage_dir("feature_concepts", "toy-raw").exists()
