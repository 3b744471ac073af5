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
CODE_DIRS = ("ddr_core", "ddr_assets", "dagster_project")

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
    assigned = dict(re.findall(r"^([A-Z_]+)=(.*)$", text, flags=re.MULTILINE))
    for name in ("DDR_DATA_ROOT", "DDR_EXPERIMENT", "DDR_CONFIG", "HF_TOKEN", "HF_ENDPOINT", "DAGSTER_HOME",
                 "DDR_SLURM_HOST", "DDR_SLURM_USER", "DDR_SLURM_KEY_PATH", "DDR_SLURM_PARTITION",
                 "DDR_SLURM_ACCOUNT"):
        assert name in assigned, name
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
