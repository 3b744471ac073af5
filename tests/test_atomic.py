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
