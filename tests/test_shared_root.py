"""A data root shared by a lab's Unix group (docs/DEPLOYMENT.md): umask, setgid folders, group-writable locks."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ddr_core.locks import OwnedFlock
from ddr_core.shared_root import apply_umask_from_env, parse_umask, prepare, problems

REPO = Path(__file__).resolve().parents[1]
GROUP = grp.getgrgid(os.getgid()).gr_name


@pytest.fixture
def group_umask():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_lock_files_are_group_writable_under_a_group_umask(tmp_path, group_umask):
    """A capture's lock made by one researcher must be openable read-write by the others (flock needs an
    open file): it was created 0644 whatever the umask, so a group member's capture failed to lock."""
    lock = OwnedFlock(tmp_path / "activations" / "tiny" / ".lock", owner="test")
    lock.acquire()
    try:
        assert stat.S_IMODE((tmp_path / "activations" / "tiny" / ".lock").stat().st_mode) == 0o664
    finally:
        lock.release()


def test_ddr_umask_is_parsed_strictly():
    assert parse_umask("0002") == 0o002 and parse_umask("007") == 0o007
    for bad in ("", "2", "0o002", "0002; rm", "0888", "0022", "0077"):  # 0022/0077 take group write away
        with pytest.raises(ValueError, match="DDR_UMASK"):
            parse_umask(bad)


def test_apply_umask_from_env(group_umask):
    assert apply_umask_from_env({}) is None
    assert apply_umask_from_env({"DDR_UMASK": "0007"}) == 0o007
    assert os.umask(0o002) == 0o007


def test_the_code_location_applies_ddr_umask_in_every_process_that_loads_it():
    """Run workers, the daemon's code server and `dagster asset materialize` all import the definitions."""
    code = "import os, dagster_project.definitions; print(oct(os.umask(0)))"
    env = {**os.environ, "DDR_UMASK": "0002"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0o2"
    env["DDR_UMASK"] = "0022"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "DDR_UMASK is '0022'" in out.stderr


def test_prepare_makes_a_tree_group_writable_with_setgid_folders(tmp_path):
    root = tmp_path / "data"
    old = os.umask(0o022)
    try:
        (root / "outputs" / "default").mkdir(parents=True)
        (root / "outputs" / "default" / "summary.json").write_text("{}")
        (root / "link").symlink_to("/etc")  # not followed
    finally:
        os.umask(old)
    found = problems(root, GROUP)
    assert any("setgid" in p for p in found) and any("lacks group rw" in p for p in found)
    assert prepare(root, GROUP) > 0
    assert problems(root, GROUP) == []
    assert prepare(root, GROUP) == 0  # idempotent
    # what is written afterwards under umask 0002 inherits the group and the setgid bit
    old = os.umask(0o002)
    try:
        (root / "outputs" / "default" / "new").mkdir()
        (root / "outputs" / "default" / "new" / "file.txt").write_text("x")
    finally:
        os.umask(old)
    assert (root / "outputs" / "default" / "new").stat().st_mode & stat.S_ISGID
    assert problems(root, GROUP) == []


def _not_group_writable(root: Path) -> list[str]:
    return [f"{p}: {stat.S_IMODE(p.stat().st_mode):04o}" for p in [root, *root.rglob("*")]
            if not p.is_symlink() and p.stat().st_mode & 0o060 != 0o060]


def test_files_ddr_writes_follow_the_group_umask_even_where_the_writer_is_stricter(tmp_path, group_umask):
    """safetensors creates files 0600 whatever the umask (batches, latents, SAE and model weights), shutil.copystat
    copies such a mode into provisioned copies and mkdtemp makes 0700 folders: a colleague could not read them."""
    import numpy as np
    from safetensors.numpy import save_file

    from ddr_core.atomic import atomic_dir, atomic_path

    with atomic_path(tmp_path / "one" / "batch.safetensors") as tmp:
        save_file({"a": np.zeros(3, dtype=np.float32)}, str(tmp))
    with atomic_dir(tmp_path / "many") as folder:
        save_file({"a": np.zeros(3, dtype=np.float32)}, str(folder / "x.safetensors"))
        os.mkdir(folder / "private", 0o700)
    assert _not_group_writable(tmp_path / "one") == [] and _not_group_writable(tmp_path / "many") == []
    assert stat.S_IMODE((tmp_path / "one" / "batch.safetensors").stat().st_mode) == 0o664


def test_provisioned_models_and_saes_are_readable_by_the_group(tmp_path, group_umask):
    """The built-in tiny model and SAE (safetensors written 0600, then copied with their mode) as the lab
    provisions them: every file group-readable and -writable under umask 0002."""
    import dagster as dg

    from tests.tiny_graph import materialize, step_error

    instance = dg.DagsterInstance.ephemeral()
    for asset, key in [("models", "tiny"), ("saes", "tiny-sae")]:
        result = materialize(asset, key, tmp_path, instance)
        assert result.success, step_error(result)
    assert list((tmp_path / "assets").rglob("*.safetensors"))
    assert _not_group_writable(tmp_path / "assets" / "models" / "tiny") == []
    assert _not_group_writable(tmp_path / "assets" / "saes" / "tiny-sae") == []
