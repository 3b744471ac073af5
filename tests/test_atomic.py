import errno
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddr_core.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_temp_files,
)


def _leftovers(directory):
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


def test_write_bytes_text_json_replace_content(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2], "b": 1}
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_path_with_third_party_writers(tmp_path):
    with atomic_path(tmp_path / "t.parquet") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".t.parquet.tmp-")
        pq.write_table(pa.table({"x": [1, 2, 3]}), tmp)
    assert pq.read_table(tmp_path / "t.parquet")["x"].to_pylist() == [1, 2, 3]
    with atomic_path(tmp_path / "i.png") as tmp:
        Image.new("RGB", (4, 4), "red").save(tmp, format="PNG")
    assert Image.open(tmp_path / "i.png").size == (4, 4)
    assert _leftovers(tmp_path) == []


def test_enospc_keeps_previous_file_and_names_path(tmp_path):
    path = tmp_path / "table.parquet"
    atomic_write_bytes(path, b"previous")
    with pytest.raises(OSError) as info, atomic_path(path) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert path.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_other_exception_deletes_temp(tmp_path):
    path = tmp_path / "x.txt"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer bug")
    assert not path.exists() and _leftovers(tmp_path) == []


def test_writer_that_creates_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not create"), atomic_path(tmp_path / "x"):
        pass


def test_atomic_dir_replaces_as_whole(tmp_path):
    target = tmp_path / "figures"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("b")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("c")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert _leftovers(tmp_path) == []


def test_remove_temp_files(tmp_path):
    (tmp_path / ".x.parquet.tmp-1-abcd").write_text("junk")
    (tmp_path / "keep.parquet").write_text("ok")
    removed = remove_temp_files(tmp_path)
    assert [p.name for p in removed] == [".x.parquet.tmp-1-abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.parquet"]


_KILL_IN_SWAP = r"""
import os, sys
from pathlib import Path
import ddr_core.atomic as atomic

target, mode, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if mode == "two-renames":
    atomic._rename_exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE
calls = {"replace": 0, "remove": 0}
real_replace, real_remove = os.replace, atomic._remove

def replace(a, b):
    calls["replace"] += 1
    if calls["replace"] == kill_at:
        os._exit(9)  # killed right before this rename
    return real_replace(a, b)

def remove(path):
    if kill_at == 0:
        os._exit(9)  # killed after the swap, before the old copy is deleted
    return real_remove(path)

os.replace, atomic._remove = replace, remove
with atomic.atomic_dir(target) as tmp:
    (tmp / "version.txt").write_text("new")
"""


@pytest.mark.parametrize(("mode", "kill_at"), [
    ("exchange", 0), ("two-renames", 1), ("two-renames", 2), ("two-renames", 3), ("two-renames", 0)])
def test_a_kill_anywhere_in_the_directory_swap_leaves_old_or_new_and_the_next_run_cleans_up(tmp_path, mode, kill_at):
    """Killed before/between/after the renames of atomic_dir's swap: the folder is there (old or new, whole),
    never missing; the next writer restores and removes what the killed one left."""
    import subprocess
    import sys

    from ddr_core.atomic import recover_dir

    target = tmp_path / "stats" / "tiny-raw"
    target.mkdir(parents=True)
    (target / "version.txt").write_text("old")
    done = subprocess.run([sys.executable, "-c", _KILL_IN_SWAP, str(target), mode, str(kill_at)])
    assert done.returncode == 9
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "tiny-raw"]
    assert leftovers, "the kill left nothing behind: the test did not stop the swap where it meant to"
    if mode == "exchange":  # one atomic step (this file system has it): no fallback names were used
        assert not any(name.endswith((".ready", ".old")) for name in leftovers)
    if mode == "exchange" or kill_at != 3:  # the one step, or a single rename: the folder never went away
        assert target.is_dir() and (target / "version.txt").read_text() in {"old", "new"}
    # the next run (a reader would see the same): the folder is back, complete, and nothing is left over
    recover_dir(target, remove_leftovers=True)
    assert (target / "version.txt").read_text() == ("old" if kill_at in (1, 2) else "new")
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-raw"]
    with atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("newer")
    assert (target / "version.txt").read_text() == "newer" and len(list(target.parent.iterdir())) == 1


def test_atomic_dir_refuses_to_replace_a_symlink(tmp_path):
    """A folder written as a whole over a link would replace the link itself (the data silently moving off the
    link's target): refused before anything is written, link and target untouched."""
    from ddr_core.paths import UnsafePathError

    target = tmp_path / "scratch" / "stats"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    link = tmp_path / "data" / "stats"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(UnsafePathError, match=rf"{link} is a symbolic link \(-> {target}\)"):
        with atomic_dir(link) as tmp:
            (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in link.parent.iterdir()) == ["stats"]
