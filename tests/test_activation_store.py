import json

import duckdb
import numpy as np
import polars as pl
import pytest
import torch
from safetensors import safe_open

from ddr_core.activation_store import (
    ActivationStore,
    ActivationStoreError,
    VariantBatch,
    top_k_channels,
)
from ddr_core.tensor_files import read_metadata

TIMESTEPS = [981, 961, 941, 921]


def generations(batch_index, per_batch=2, images_per_prompt=1):
    rows = []
    for i in range(per_batch):
        gid = batch_index * per_batch + i
        rows.append(
            {
                "generation_id": gid,
                "prompt_index": gid // images_per_prompt,
                "prompt": f"prompt {gid // images_per_prompt}",
                "image_index": gid % images_per_prompt,
                "seed": 1000 + gid,
                "image_path": f"images/{gid:06d}.png",
            }
        )
    return rows


def activations(batch_index, per_batch=2, width=6, seed=0):
    rng = np.random.default_rng(seed + batch_index)
    return rng.normal(size=(per_batch, len(TIMESTEPS), width)).astype(np.float32)


def write(store, batch_index, width=6, top_k=3, **variant_kwargs):
    cond = activations(batch_index, width=width)
    per_variant = {"raw": VariantBatch(conditional=cond, unconditional=cond + 100.0)}
    per_variant.update(variant_kwargs)
    return store.write_batch(batch_index, generations(batch_index), TIMESTEPS, per_variant, capture_top_k=top_k)


def test_top_k_channels_ties_and_order():
    values = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [np.nan, 0.0, 5.0, 5.0, -1.0]])
    idx, vals = top_k_channels(values, 2)
    assert idx.tolist() == [[1, 2], [2, 3]]
    assert vals.tolist() == [[3.0, 3.0], [5.0, 5.0]]
    idx, _ = top_k_channels(values, 5)
    assert idx.tolist() == [[1, 2, 4, 3, 0], [2, 3, 1, 4, 0]]
    with pytest.raises(ValueError, match="width 5"):
        top_k_channels(values, 6)


def test_top_k_channels_matches_full_sort_on_random():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 5, size=(50, 40)).astype(np.float32)  # many ties
    idx, vals = top_k_channels(values, 7)
    for row in range(50):
        expected = sorted(range(40), key=lambda c: (-values[row, c], c))[:7]
        assert idx[row].tolist() == expected
        assert vals[row].tolist() == values[row, expected].tolist()


def test_write_and_read_back(tmp_path):
    store = ActivationStore(tmp_path / "cap")
    write(store, 0)
    write(store, 1)
    assert store.finished_batches() == {0, 1}
    assert store.variants() == ["raw"]
    assert store.width("raw") == 6
    assert json.loads((store.root / "timesteps.json").read_text()) == TIMESTEPS

    dense_file = store.root / "raw" / "batches" / "batch_00000.safetensors"
    with safe_open(str(dense_file), framework="numpy") as handle:
        assert read_metadata(handle) == {"variant": "raw", "width": "6", "batch_index": "0"}
        assert handle.get_tensor("conditional").dtype == np.float16
        assert handle.get_tensor("generation_ids").dtype == np.int64
        assert handle.get_tensor("timesteps").tolist() == TIMESTEPS

    batches = list(store.iter_dense("raw"))
    assert [b[0].tolist() for b in batches] == [[0, 1], [2, 3]]
    for index, (_ids, ts, dense) in enumerate(batches):
        assert ts.tolist() == TIMESTEPS and dense.dtype == np.float32
        np.testing.assert_array_equal(dense, activations(index).astype(np.float16).astype(np.float32))
    _, _, uncond = next(store.iter_dense("raw", half="unconditional"))
    assert uncond.min() > 90

    summary = store.finalize()
    assert summary["generations"] == 4 and summary["dense_ids"] and summary["missing_batches"] == []
    assert summary["channels"] == {"raw": 6} and summary["timesteps"] == TIMESTEPS and summary["bytes"] > 0
    gens = pl.read_parquet(store.root / "generations.parquet")
    assert gens["generation_id"].to_list() == [0, 1, 2, 3]
    assert gens["batch_index"].to_list() == [0, 0, 1, 1]
    assert gens.schema["seed"] == pl.Int64


def test_topk_and_max_parts_match_dense(tmp_path):
    store = ActivationStore(tmp_path)
    write(store, 0, top_k=3)
    write(store, 1, top_k=3)
    store.finalize()
    con = duckdb.connect()
    topk = con.execute(
        f"select generation_id, timestep, rank, channel, activation from read_parquet('{store.topk_glob('raw')}') "
        "order by generation_id, timestep desc, rank"
    ).fetchall()
    expected = []
    for ids, ts, dense in store.iter_dense("raw"):
        for gi, gid in enumerate(ids):
            for ti, t in enumerate(ts):
                order = sorted(range(6), key=lambda c: (-dense[gi, ti, c], c))[:3]
                expected += [(gid, t, r, c, pytest.approx(dense[gi, ti, c])) for r, c in enumerate(order)]
    assert topk == expected

    maxima = con.execute(
        f"select channel, timestep, max(max_activation), arg_max(argmax_generation_id, max_activation) "
        f"from read_parquet('{store.max_glob('raw')}') group by all order by channel, timestep"
    ).fetchall()
    everything = np.concatenate([d for _, _, d in store.iter_dense("raw")])  # (4, T, F)
    for channel, timestep, value, gid in maxima:
        column = everything[:, TIMESTEPS.index(timestep), channel]
        assert value == pytest.approx(column.max()) and gid == int(column.argmax())


def test_torch_input_and_unsorted_generations(tmp_path):
    store = ActivationStore(tmp_path)
    cond = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    rows = generations(0)[::-1]  # ids 1, 0: row i describes cond[i]
    store.write_batch(0, rows, TIMESTEPS, {"sae": VariantBatch(cond)})
    ids, _, dense = next(store.iter_dense("sae"))
    assert ids.tolist() == [0, 1]
    np.testing.assert_array_equal(dense[0], cond[1].numpy())
    with pytest.raises(ActivationStoreError, match="unconditional"):
        next(store.iter_dense("sae", half="unconditional"))


def _snapshot(root):
    """File contents, safetensors included (their metadata is one canonical JSON key: stable bytes)."""
    return {path: path.read_bytes() for path in sorted(p for p in root.rglob("*") if p.is_file())}


def test_rewrite_is_idempotent(tmp_path):
    store = ActivationStore(tmp_path)
    first = write(store, 0)
    before = _snapshot(tmp_path)
    second = write(store, 0)
    assert first == second and before == _snapshot(tmp_path)
    assert store.finished_batches() == {0}


def test_unfinished_batches_are_ignored_and_cleaned(tmp_path):
    store = ActivationStore(tmp_path)
    write(store, 0)
    write(store, 1)
    # Batch 1 crashed before its marker; batch 2 left only a temp file; batch 0 lost a file.
    (tmp_path / "done" / "batch_00001.json").unlink()
    (tmp_path / "raw" / "topk" / ".batch_00002.parquet.tmp-123-abcd").write_bytes(b"junk")
    assert store.finished_batches() == {0}
    assert [ids.tolist() for ids, _, _ in store.iter_dense("raw")] == [[0, 1]]
    summary = store.finalize()
    assert summary["generations"] == 2
    leftovers = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and ("00001" in p.name or "tmp" in p.name))
    assert leftovers == []
    # A marker whose files changed size no longer counts.
    (tmp_path / "raw" / "max" / "batch_00000.parquet").write_bytes(b"truncated")
    assert store.finished_batches() == set()


def test_validation_errors(tmp_path):
    store = ActivationStore(tmp_path)
    write(store, 0)
    with pytest.raises(ActivationStoreError, match="timesteps"):
        store.write_batch(1, generations(1), [1, 2, 3, 4], {"raw": VariantBatch(activations(1))})
    with pytest.raises(ActivationStoreError, match="width 5 differs"):
        store.write_batch(1, generations(1), TIMESTEPS, {"raw": VariantBatch(activations(1, width=5))})
    with pytest.raises(ActivationStoreError, match="expected shape"):
        store.write_batch(1, generations(1), TIMESTEPS, {"raw": VariantBatch(activations(1)[:, :2])})
    with pytest.raises(ActivationStoreError, match="lack the columns"):
        store.write_batch(1, [{"generation_id": 2}], TIMESTEPS, {"raw": VariantBatch(activations(1)[:1])})
    with pytest.raises(ActivationStoreError, match="not a safe folder name"):
        store.write_batch(1, generations(1), TIMESTEPS, {"../x": VariantBatch(activations(1))})
    with pytest.raises(ActivationStoreError, match="no finished batch"):
        store.width("missing")
    assert store.finished_batches() == {0}


def test_duplicate_generation_ids_across_batches(tmp_path):
    store = ActivationStore(tmp_path)
    write(store, 0)
    store.write_batch(1, [dict(r, batch_index=1) for r in generations(0)], TIMESTEPS,
                      {"raw": VariantBatch(activations(1))})
    with pytest.raises(ActivationStoreError, match="several batches"):
        store.finalize()


def test_enospc_during_batch_leaves_it_unfinished(tmp_path, monkeypatch):
    import errno

    import ddr_core.activation_store as module

    store = ActivationStore(tmp_path)
    write(store, 0)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "save_file", full_disk)
    with pytest.raises(OSError, match="batch_00001.safetensors") as info:
        write(store, 1)
    assert info.value.errno == errno.ENOSPC
    assert store.finished_batches() == {0}
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert [ids.tolist() for ids, _, _ in store.iter_dense("raw")] == [[0, 1]]


def test_safetensors_bytes_are_the_same_in_every_process(tmp_path):
    """The same batch written by separate processes (each with its own hash seed) is the same bytes: the
    metadata is one canonical JSON key, not a map the library writes in a process-dependent order."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from ddr_core.activation_store import ActivationStore, VariantBatch\n"
        "from tests.test_activation_store import TIMESTEPS, generations\n"
        "rng = np.random.default_rng(0)\n"
        "store = ActivationStore(sys.argv[1])\n"
        "values = rng.normal(size=(2, len(TIMESTEPS), 6)).astype('float32')\n"
        "store.write_batch(0, generations(0), TIMESTEPS, {'raw': VariantBatch(values, None)})\n"
    )
    outputs = []
    for seed in ("1", "2", "3"):
        root = tmp_path / f"run{seed}"
        subprocess.run([sys.executable, "-c", script, str(root)], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed})
        outputs.append((root / "raw" / "batches" / "batch_00000.safetensors").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
