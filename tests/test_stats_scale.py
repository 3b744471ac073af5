"""timestep_stats at scale: streaming in chunks within a memory budget, results equal to an in-memory reference,
and the scale benchmark's planted answers (run at a tiny size)."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from ddr_core import stats_streaming
from ddr_core.activation_store import ActivationStore, VariantBatch
from ddr_core.statistics import TimestepStatsConfig, compute_timestep_stats
from ddr_core.stats_streaming import MemoryBudgetError, TopExamples, plan_memory
from tests.benchmark_scripts import load_benchmark

TIMESTEPS = [901, 701, 501, 301, 101]


def _bench():
    return load_benchmark("bench_stats_scale")


def _tied_store(root: Path, generations: int = 23, width: int = 9, order=None) -> tuple[ActivationStore, np.ndarray]:
    """Values from a few levels (many exact ties) in batches of uneven size, written in ``order``."""
    rng = np.random.default_rng(3)
    values = rng.integers(0, 4, size=(generations, len(TIMESTEPS), width)).astype(np.float16) / 2
    store = ActivationStore(root)
    bounds = [0, 5, 6, 13, 20, generations]
    batches = list(range(len(bounds) - 1))
    for position, batch in enumerate(order or batches):
        ids = list(range(bounds[batch], bounds[batch + 1]))
        rows = [{"generation_id": g, "prompt_index": g, "prompt": f"p{g}", "image_index": 0, "seed": g,
                 "image_path": f"i{g}.png"} for g in ids]
        store.write_batch(position, rows, TIMESTEPS, {"raw": VariantBatch(values[ids])}, capture_top_k=3)
    store.finalize()
    return store, values.astype(np.float32)


def _reference(values: np.ndarray, top_k: int, n_examples: int) -> dict[str, pl.DataFrame]:
    """The whole array in memory: top-k per (generation, timestep) (ties to the lower channel), then frequency,
    dataset examples (activation desc, ties to the lower generation) and the maximum."""
    g, t, f = values.shape
    topk = []
    for gi in range(g):
        for ti in range(t):
            order = sorted(range(f), key=lambda c: (-values[gi, ti, c], c))[:top_k]
            topk += [(gi, TIMESTEPS[ti], rank, c, float(values[gi, ti, c])) for rank, c in enumerate(order)]
    topk_frame = pl.DataFrame(topk, schema=["generation_id", "timestep", "rank", "channel", "activation"], orient="row")
    frequency = (topk_frame.group_by("channel", "timestep").agg(pl.len().alias("count"))
                 .sort("channel", pl.col("timestep"), descending=[False, True]))
    frequency = frequency.with_columns(pl.Series("frequency", frequency["count"].to_numpy() / g))  # IEEE division
    examples = (topk_frame.sort("activation", "generation_id", descending=[True, False])
                .group_by("channel", "timestep", maintain_order=True).head(n_examples)
                .with_columns(pl.col("generation_id").cum_count().over("channel", "timestep").alias("rank") - 1)
                .sort("channel", "timestep", "rank", descending=[False, True, False]))
    maximum = [(c, TIMESTEPS[ti], float(values[:, ti, c].max())) for c in range(f) for ti in range(t)]
    return {"topk": topk_frame, "frequency": frequency.select("channel", "timestep", "count", "frequency"),
            "dataset_examples": examples.select("channel", "timestep", "rank", "generation_id", "activation"),
            "max_activation": pl.DataFrame(maximum, schema=["channel", "timestep", "max_activation"], orient="row")}


def _same(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    got = got.select(expected.columns).cast({c: pl.Float64 if got[c].dtype.is_float() else pl.Int64
                                             for c in expected.columns})
    expected = expected.cast({c: pl.Float64 if expected[c].dtype.is_float() else pl.Int64 for c in expected.columns})
    assert got.to_dicts() == expected.to_dicts()


@pytest.mark.parametrize("order", [None, [2, 0, 4, 1, 3]], ids=["in-order", "shuffled-batches"])
def test_streaming_in_chunks_equals_the_in_memory_reference(tmp_path, monkeypatch, order):
    """Chunks of one generation (a huge per-value cost forces it), batches in or out of generation order
    (the latter takes DuckDB's out-of-core sort): every table equals the in-memory reference, ties included."""
    store, values = _tied_store(tmp_path / "store", order=order)
    config = TimestepStatsConfig(top_k=3, n_examples=4)
    monkeypatch.setattr(stats_streaming, "BYTES_PER_DENSE_VALUE", 10**9)
    assert plan_memory(config.memory_budget_mib, 9, len(TIMESTEPS), 4).chunk_generations == 1
    logs: list[str] = []
    compute_timestep_stats(store, "raw", tmp_path / "stats", config, log=logs.append)
    assert any("23 generations read" in m for m in logs) and any("23 chunks" in m for m in logs)
    expected = _reference(values, 3, 4)
    for name, frame in expected.items():
        _same(pl.read_parquet(tmp_path / "stats" / f"{name}.parquet"), frame)
    examples = pl.read_parquet(tmp_path / "stats" / "dataset_examples.parquet")
    assert examples["prompt"].to_list() == [f"p{g}" for g in examples["generation_id"]]


def test_top_examples_merge_keeps_the_best_with_ties_to_the_lower_generation():
    examples = TopExamples(n_timesteps=1, width=2, n=2)
    examples.add(np.array([0, 0, 0]), np.array([1, 1, 0]), np.array([5.0, 5.0, 1.0]), np.array([7, 3, 9]))
    examples.add(np.array([0, 0]), np.array([1, 1]), np.array([5.0, 6.0]), np.array([1, 8]))
    table = pl.from_arrow(examples.table(np.array([500]))).sort("channel", "rank")
    assert table.select("channel", "rank", "generation_id", "activation").rows() == [
        (0, 0, 9, 1.0), (1, 0, 8, 6.0), (1, 1, 1, 5.0)]


def test_memory_budget_is_validated_at_config_load_and_against_the_width(tmp_path):
    assert TimestepStatsConfig(memory_budget_mib=2048).memory_budget_mib == 2048
    with pytest.raises(ValidationError, match="memory_budget_mib"):
        TimestepStatsConfig(memory_budget_mib=100)
    # the budget changes how, never what: not in the hash that keys the results
    assert TimestepStatsConfig(memory_budget_mib=2048).config_hash() == TimestepStatsConfig().config_hash()
    # thesis width at 4 GiB: 20 examples fit, with chunks of generations; 400 examples do not, and the error says so
    plan = plan_memory(4096, 20480, 50, 20)
    assert plan.fixed_mib < 400 and plan.chunk_generations >= 8 and plan.duckdb_memory_mib >= 256
    with pytest.raises(MemoryBudgetError, match="raise memory_budget_mib to at least .* or lower n_examples"):
        plan_memory(4096, 20480, 50, 400)
    store, _ = _tied_store(tmp_path / "store")
    small_budget = TimestepStatsConfig(top_k=3, n_examples=2, memory_budget_mib=1024)
    compute_timestep_stats(store, "raw", tmp_path / "ok", small_budget)
    too_many = TimestepStatsConfig(top_k=3, n_examples=600_000, memory_budget_mib=1024)
    with pytest.raises(MemoryBudgetError, match="memory_budget_mib=1024"):
        compute_timestep_stats(store, "raw", tmp_path / "refused", too_many)
    assert not any(p.name.startswith((".refused", "refused")) for p in tmp_path.iterdir())  # nothing written


def test_iter_dense_reads_a_batch_in_chunks(tmp_path):
    store, values = _tied_store(tmp_path / "store")
    chunks = list(store.iter_dense("raw", max_generations=2))
    assert [len(ids) for ids, _, _ in chunks] == [2, 2, 1, 1, 2, 2, 2, 1, 2, 2, 2, 1, 2, 1]
    assert np.array_equal(np.concatenate([a for _, _, a in chunks]), values)


def test_scale_benchmark_finds_its_planted_answers_at_a_tiny_size(tmp_path, capsys):
    bench = _bench()
    # the child's peak RSS is its own: this process grown by 1.2 GiB does not push a tiny run over a 1 GiB budget
    # (Linux carries a parent's high-water mark into the child's ru_maxrss across execve)
    ballast = np.ones(1200 * 2**20, dtype=np.uint8)
    assert bench.main(["--generations", "48", "--timesteps", "6", "--channels", "24", "--batch", "8", "--top-k", "4",
                       "--scales", "0.5", "1", "--memory-budget-mib", "1024",
                       "--workdir", str(tmp_path / "a new" / "disk")]) == 0  # --workdir made if missing
    del ballast
    out = capsys.readouterr().out
    assert "planted answers found at every scale" in out and "M values/s" in out and "thesis capture" in out
    # the checker can fail: a store without the planted examples is reported, example by example
    store = tmp_path / "plain"
    answers = bench.write_store(store, 16, 6, 24, 8)
    compute_timestep_stats(ActivationStore(store), bench.VARIANT, tmp_path / "stats", TimestepStatsConfig(top_k=4))
    wrong = {**answers, "examples": list(reversed(answers["examples"]))}
    assert any("examples" in p for p in bench.check_planted(tmp_path / "stats", wrong, 16, 4))
    assert bench.check_planted(tmp_path / "stats", answers, 16, 4) == []


def test_store_without_summaries_keeps_what_the_stages_read_and_gives_the_same_statistics(tmp_path):
    """write_batch(summaries=False) (capture's store_summaries: false) leaves out the top-k and max parts that
    no stage reads; the statistics are the same tables, the store smaller."""
    from ddr_core.activations import CaptureConfig

    assert CaptureConfig(store_summaries=False).store_summaries is False and CaptureConfig().store_summaries
    values = np.random.default_rng(1).random((12, len(TIMESTEPS), 16)).astype(np.float16)
    sizes = {}
    for summaries in (True, False):
        store = ActivationStore(tmp_path / f"store_{summaries}")
        for batch in range(3):
            ids = range(batch * 4, batch * 4 + 4)
            rows = [{"generation_id": g, "prompt_index": g, "prompt": f"p{g}", "image_index": 0, "seed": g,
                     "image_path": f"i{g}.png"} for g in ids]
            marker = store.write_batch(batch, rows, TIMESTEPS, {"raw": VariantBatch(values[list(ids)])},
                                       summaries=summaries)
            assert marker["summaries"] is summaries
        store.finalize()
        assert store.finished_batches() == {0, 1, 2}
        assert (store.root / "raw" / "topk").exists() is summaries and (store.root / "raw" / "max").exists() is summaries
        sizes[summaries] = sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file())
        compute_timestep_stats(store, "raw", tmp_path / f"stats_{summaries}", TimestepStatsConfig(top_k=3))
    assert sizes[False] < sizes[True]
    for name in ("topk", "frequency", "dataset_examples", "max_activation", "channels", "activity_peaks"):
        assert pl.read_parquet(tmp_path / f"stats_True/{name}.parquet").equals(
            pl.read_parquet(tmp_path / f"stats_False/{name}.parquet")), name


def test_top_k_channels_equals_a_full_sort_with_ties_to_the_lower_channel():
    """The ranking computes the tie cumulative count only for rows with surplus ties: same result as sorting."""
    from ddr_core.activation_store import top_k_channels

    rng = np.random.default_rng(0)
    for trial in range(200):
        rows, width = int(rng.integers(1, 12)), int(rng.integers(1, 30))
        k = int(rng.integers(1, width + 1))
        values = rng.integers(0, int(rng.integers(1, 5)), size=(rows, width)).astype(np.float32)
        if trial % 3 == 0:
            values[rng.random(values.shape) < 0.2] = np.nan
        indices, top = top_k_channels(values.copy(), k)
        clean = np.where(np.isnan(values), -np.inf, values)
        expected = np.array([sorted(range(width), key=lambda c, r=r: (-clean[r, c], c))[:k] for r in range(rows)])
        assert np.array_equal(indices, expected), trial
        assert np.array_equal(top, np.take_along_axis(clean, expected, axis=1)), trial


def test_a_variant_memory_budget_is_validated_when_the_project_config_loads(tmp_path):
    from ddr_core.config import DEFAULT_CONFIG_PATH, ConfigError, load_project_config

    text = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    old = "      priors: {steer_strength_scale: 15.0}\n"
    assert old in text
    for budget, ok in ((100, False), (2048, True)):
        path = tmp_path / f"ddr_{budget}.yaml"
        path.write_text(text.replace(old, old + f"      timestep_stats: {{memory_budget_mib: {budget}}}\n", 1))
        if ok:
            assert load_project_config(path).variants["toy-raw"].overrides["timestep_stats"] == {
                "memory_budget_mib": 2048}
        else:
            with pytest.raises(ConfigError, match="timestep_stats.memory_budget_mib: Input should be greater"):
                load_project_config(path)


def test_feature_concepts_peak_examples_stream_in_chunks_with_the_same_answer(tmp_path, monkeypatch):
    """peak_all_generations used to hold generations x channels rows (102 M at thesis scale, with a prompt
    string each); with n_examples set it now keeps the best prompts chunk by chunk: same examples, ties
    (equal activations, several images per prompt) included."""
    from ddr_core.feature_concepts import purity
    from ddr_core.feature_concepts.config import FeatureConceptsConfig

    rng = np.random.default_rng(5)
    generations, width = 30, 6
    values = rng.integers(0, 3, size=(generations, len(TIMESTEPS), width)).astype(np.float16)
    store = ActivationStore(tmp_path / "store")
    for batch, start in enumerate(range(0, generations, 7)):
        ids = list(range(start, min(start + 7, generations)))
        rows = [{"generation_id": g, "prompt_index": g // 3, "prompt": f"prompt {g // 3}", "image_index": g % 3,
                 "seed": g, "image_path": f"i{g}.png"} for g in ids]
        store.write_batch(batch, rows, TIMESTEPS, {"raw": VariantBatch(values[ids])})
    store.finalize()
    stats = tmp_path / "stats"
    stats.mkdir()
    pl.DataFrame({"channel": pl.Series(range(width), dtype=pl.Int32), "peak_rank": pl.Series([0] * width, dtype=pl.Int32),
                  "observed_timestep": pl.Series([TIMESTEPS[c % len(TIMESTEPS)] for c in range(width)], dtype=pl.Int64)
                  }).write_parquet(stats / "activity_peaks.parquet")
    everything = purity.top_examples(stats, FeatureConceptsConfig(n_examples=None), store=store, variant="raw")
    monkeypatch.setattr(purity, "PEAK_ROWS_PER_CHUNK", 1)  # one generation per chunk
    for n in (1, 3, 20):
        streamed = purity.top_examples(stats, FeatureConceptsConfig(n_examples=n), store=store, variant="raw")
        assert streamed.equals(everything.filter(pl.col("rank") < n)), n
