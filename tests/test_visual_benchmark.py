"""The visualisation benchmark (ddr_core.visual_benchmark, ddr_core.contact_sheet, the visual_benchmark asset):
each statistic on a case whose answer is known by hand, the table and contact sheet on a small synthetic data
root, and the asset on it (and on a copy of a finished demo, when one is at hand)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ddr_core.benchmark_stats import cluster_bootstrap, pairwise_rmse, sign_flip_test
from ddr_core.contact_sheet import plain_label
from ddr_core.paths import DataLayout
from ddr_core.visual_benchmark import VisualBenchmarkConfig, benchmark_lines, compute_visual_benchmark

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
FAST = VisualBenchmarkConfig(permutations=10000, bootstrap_resamples=2000, contact_columns=2, contact_cell=32)


# --- statistics with known answers ----------------------------------------------------------------------------


def test_sign_flip_p_value_is_exact_for_few_channels() -> None:
    # three positive channel means: only the identity of the 2**3 sign vectors reaches the observed mean
    assert sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(1 / 8)
    # [3, -1]: flips give means 1, -2, 2, -1; two of four reach 1
    assert sign_flip_test([3.0, -1.0]) == pytest.approx(0.5)
    # Monte Carlo beyond 2**n > permutations: 20 positive values, p at its resolution 1 / (1 + permutations)
    assert sign_flip_test([1.0] * 20, permutations=1000) == pytest.approx(1 / 1001)


def test_cluster_bootstrap_resamples_whole_channels() -> None:
    # clusters A = [0] and B = [1, 1, 1]: resampled means 0 (AA, 1/4), 0.75 (AB, 1/2), 1 (BB, 1/4), so the
    # central 40% of the bootstrap distribution is exactly 0.75 (a per-value bootstrap would spread around 0.75)
    low, high = cluster_bootstrap([0, 1, 1, 1], ["A", "B", "B", "B"], level=0.4, resamples=4000)
    assert (low, high) == (pytest.approx(0.75), pytest.approx(0.75))
    # 200 channels of 5 identical 0/1 values (half each): the half-width is 1.96 * 0.5 / sqrt(200) = 0.069, not
    # the 0.031 of 1000 independent values
    values = np.repeat([0.0, 1.0] * 100, 5)
    low, high = cluster_bootstrap(values, np.repeat(np.arange(200), 5), resamples=4000)
    assert 0.06 < (high - low) / 2 < 0.08
    assert np.isnan(cluster_bootstrap([1.0, 2.0], ["only", "only"])[0])


def test_pairwise_rmse() -> None:
    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    assert pairwise_rmse([black, white]) == [pytest.approx(1.0)]
    assert pairwise_rmse([black, black, white]) == [0.0, pytest.approx(1.0), pytest.approx(1.0)]


def test_labels_are_plain_printable_text() -> None:
    assert plain_label("![x](http://a) \u00e9\n", 40) == "![x](http://a) ??"
    assert plain_label("abcdefgh", 5) == "abcd~"


# --- a synthetic data root --------------------------------------------------------------------------------------


def _png(root: Path, relative: str, colour: str) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), COLOURS[colour]).save(path)
    return relative


def write_root(root: Path, hostile: str = "colour=red") -> DataLayout:
    """Channels 0-2 selective for colour red / green / blue (channel 3 for shape=circle, never run); each run
    channel has 2 priors drawn and predicted in its colour, and dreams: channel 0 raised at t=519 and a no-op at
    t=979, channel 1 raised, channel 2 only no-ops. Channel 0's concept text is ``hostile``."""
    layout = DataLayout(root, "default")
    fc = layout.stage_dir("feature_concepts", "toy-raw")
    fc.mkdir(parents=True)
    rows = [{"channel": c, "concept": text, "n_concepts": 1, "dominant_colour": colour, "q_colour": q,
             "dominant_shape": "circle", "q_shape": q_shape}
            for c, text, colour, q, q_shape in [(0, hostile, "red", 0.001, 0.9), (1, "colour=green", "green", 0.002, 0.9),
                                                 (2, "colour=blue", "blue", 0.003, 0.9),
                                                 (3, "shape=circle", "red", 0.9, 0.004)]]
    rows.append({"channel": 4, "concept": "", "n_concepts": 0, "dominant_colour": "red", "q_colour": 0.5,
                 "dominant_shape": "square", "q_shape": 0.5})
    pl.DataFrame(rows).write_parquet(fc / "feature_concepts.parquet")
    (fc / "summary.json").write_text(json.dumps({
        "families": ["colour", "shape"], "config": {"alpha": 0.05, "recognisable_rmse": 0.15}, "config_hash": "fc",
        "world": {"generations": {"recognisable": 0.9}}}))
    colours = {0: "red", 1: "green", 2: "blue"}
    priors, dreams, quality = [], [], []
    for channel, colour in colours.items():
        folder = f"outputs/default/priors/toy-raw/channel_{channel:05d}"
        images = [_png(root, f"{folder}/seed_{s}.png", colour) for s in (1, 2)]
        prior_gain = {0: 1.0, 1: 2.0, 2: 0.0}[channel]  # channel 2's steering does nothing
        activation = {"format": "ddr.prior_gain/1", "timestep": 519, "noise_draws": 1, "unsteered": [0.0, 0.2],
                      "steered": [prior_gain, 0.2 + prior_gain], "unsteered_draw_sd": [0.0, 0.0],
                      "steered_draw_sd": [0.0, 0.0]}
        (root / folder / "prior.json").write_text(json.dumps({"status": "done", "seeds": [1, 2], "images": images,
                                                              "activation": activation}))
        priors += [{"channel": channel, "image": p, "colour": colour, "shape": "circle", "world_rmse": rmse}
                   for p, rmse in zip(images, (0.1, 0.2), strict=True)]
        results = {}
        for timestep in {0: (519, 979), 1: (519,), 2: (979,)}[channel]:
            folder = f"outputs/default/dreams/toy-raw/channel_{channel:05d}/t_{timestep:04d}"
            drawn = [colour, "red"]  # seed 2 draws red whatever the channel
            images = [_png(root, f"{folder}/seed_{s}.png", c) for s, c in zip((1, 2), drawn, strict=True)]
            results[str(timestep)] = {"seeds": [1, 2], "images": images}
            dreams += [{"channel": channel, "image": p, "colour": c, "shape": "circle", "world_rmse": 0.1}
                       for p, c in zip(images, drawn, strict=True)]
            gain = 1.0 if timestep == 519 else 0.0  # starts 0.0 / 0.2: seed sd 0.141
            quality += [{"channel": channel, "timestep": timestep, "seed": s, "prior_activation": start,
                         "dream_activation": start + gain, "failed": False} for s, start in ((1, 0.0), (2, 0.2))]
        (root / f"outputs/default/dreams/toy-raw/channel_{channel:05d}/dream.json").write_text(
            json.dumps({"results": results, "failures": [], "config": {"num_steps": 4}}))
    pl.DataFrame(priors).write_parquet(fc / "prior_predictions.parquet")
    pl.DataFrame(dreams).write_parquet(fc / "dream_predictions.parquet")
    pl.DataFrame(quality).write_parquet(layout.stage_dir("dreams", "toy-raw") / "quality.parquet")
    return layout


def _run(layout: DataLayout, random_baseline=None, classify=None):
    stages = {s: layout.stage_dir(s, "toy-raw") for s in ("priors", "dreams", "dreams_no_noise")}
    return compute_visual_benchmark("toy-raw", layout.data_root, layout.stage_dir("feature_concepts", "toy-raw"),
                                    stages, layout.stage_dir("visual_benchmark", "toy-raw"), FAST,
                                    random_baseline=random_baseline, classify=classify)


def _metric(table: pl.DataFrame, method: str, metric: str) -> dict:
    return table.filter((pl.col("method") == method) & (pl.col("metric") == metric)).row(0, named=True)


def test_benchmark_table_has_the_known_figures(tmp_path: Path) -> None:
    result = _run(write_root(tmp_path))
    table = result.table
    assert set(table["method"]) == {"priors", "dreams"}  # no dreams_no_noise folder: no rows
    # priors: 3 channels each predicted as its own colour -> rate 1, per-image chance 1/3; the permutation p is
    # the share of the 3! colour permutations among the channels that reach 1: exactly 1/6
    agreement = _metric(table, "priors", "agreement_selective")
    assert agreement["value"] == 1.0 and agreement["chance"] == pytest.approx(1 / 3) and agreement["n"] == 3
    assert agreement["p_value"] == pytest.approx(1 / 6, abs=0.015)
    assert _metric(table, "priors", "recognisable")["value"] == 0.5  # rmse 0.1 and 0.2 against 0.15
    assert _metric(table, "priors", "recognisable")["chance"] == 0.9  # the generations' reference
    assert _metric(table, "priors", "seed_diversity")["value"] == 0.0  # both seeds drew the same colour
    assert _metric(table, "priors", "coverage")["value"] == pytest.approx(3 / 4)  # channel 3 never ran
    # dreams: channels 0 and 1 raised at t=519 (gain 1 > sd 0.141 over seeds); the t=979 dreams (gain 0) are
    # no-ops: counted, not scored
    assert _metric(table, "dreams", "no_op_dreams")["value"] == 4 and _metric(table, "dreams", "no_op_dreams")["n"] == 8
    late = _metric(table, "dreams", "no_op_dreams_t959")
    assert late["value"] == 4 and late["n"] == 4
    assert _metric(table, "dreams", "raised_share")["value"] == 0.5
    gain = _metric(table, "dreams", "gain_over_start")
    assert gain["value"] == pytest.approx(0.5)  # 4 dreams of gain 1, 4 of gain 0
    # channel means 0.5, 1, 0: of the 8 exact sign flips, the two that keep 0.5 and 1 positive reach the mean
    assert gain["p_value"] == pytest.approx(2 / 8)
    assert _metric(table, "dreams", "gain_over_best_random")["value"] is None  # not measured, said so
    assert "not measured" in _metric(table, "dreams", "gain_over_best_random")["note"]
    # raised dreams of channels 0 and 1: seed 1 in the channel's colour, seed 2 red -> agreement (1 + 0.5) / 2
    assert _metric(table, "dreams", "agreement_selective")["value"] == pytest.approx(0.75)
    assert _metric(table, "dreams", "seed_diversity")["value"] == pytest.approx((0.0 + np.sqrt(2 / 3)) / 2)
    assert _metric(table, "dreams", "coverage")["value"] == pytest.approx(2 / 4)
    reasons = dict(result.coverage.filter(pl.col("method") == "dreams").select("channel", "reason").iter_rows())
    assert reasons[2].startswith("every dream a no-op") and reasons[3].startswith("not run")
    assert reasons[0] == reasons[1] == ""
    assert 4 not in reasons  # not selective: not expected
    saved = pl.read_parquet(result.out_dir / "benchmark.parquet")
    assert saved.columns[:4] == ["variant", "method", "metric", "value"] and saved.height == table.height


def test_priors_report_their_gain_over_the_unsteered_generation(tmp_path: Path) -> None:
    table = _run(write_root(tmp_path)).table
    # per-seed gains 1, 1 (channel 0), 2, 2 (channel 1), 0, 0 (channel 2): mean 1; channel means 1, 2, 0: of the 8
    # exact sign flips the two keeping 1 and 2 positive reach the observed mean, p = 2/8
    gain = _metric(table, "priors", "gain_over_unsteered")
    assert gain["value"] == pytest.approx(1.0) and gain["n"] == 6 and gain["p_value"] == pytest.approx(2 / 8)
    assert gain["low"] <= 1.0 <= gain["high"] and gain["chance"] == 0.0
    # raised: gain above the sd 0.141 of the unsteered activations (0.0, 0.2) -> channels 0 and 1, not 2
    assert _metric(table, "priors", "raised_over_unsteered_share")["value"] == pytest.approx(4 / 6)
    gaining = _metric(table, "priors", "channels_gaining")
    assert gaining["value"] == 2 and gaining["n"] == 3
    assert not table.filter(pl.col("method") == "dreams")["metric"].is_in(["gain_over_unsteered"]).any()
    lines = benchmark_lines(table)
    assert any("toy-raw priors:" in line and "gain over unsteered 1.000" in line and "channels gaining 2 of 3" in line
               for line in lines)


def test_dreams_are_compared_with_the_best_random_latent(tmp_path: Path) -> None:
    calls = []

    def baseline(pairs, settings, size):  # the best random latent fires at 0.5 everywhere
        calls.append((pairs, settings["num_steps"], size))
        return pl.DataFrame({"channel": [c for c, _ in pairs], "timestep": [t for _, t in pairs],
                             "best_random": [0.5] * len(pairs), "n_random": [8] * len(pairs)},
                            schema_overrides={"channel": pl.Int32})

    table = _run(write_root(tmp_path), baseline).table
    assert calls == [([(0, 519), (0, 979), (1, 519), (2, 979)], 4, (8, 8))]  # dreams only, their settings
    # finals 1.0 / 1.2 at t=519 (channels 0, 1), 0.0 / 0.2 at t=979 (channels 0, 2); minus 0.5: 0.5, 0.7, -0.5,
    # -0.3 for channel 0, 0.5, 0.7 for 1, -0.5, -0.3 for 2: mean 0.8 / 8 = 0.1
    versus = _metric(table, "dreams", "gain_over_best_random")
    assert versus["value"] == pytest.approx(0.1)
    assert _metric(table, "dreams", "beats_best_random")["value"] == pytest.approx(4 / 8)
    # channel means 0.1, 0.6, -0.4 (sum 0.3): the sign flips reaching it are +++, ++-, -+-: 3 of 8
    assert versus["p_value"] == pytest.approx(3 / 8)


def test_a_method_feature_concepts_did_not_classify_is_classified_by_the_callable(tmp_path: Path) -> None:
    layout = write_root(tmp_path)
    shutil.copytree(layout.stage_dir("dreams", "toy-raw"), layout.stage_dir("dreams_no_noise", "toy-raw"))
    seen = []

    def classify(paths, families):  # everything is predicted blue, far from the world
        seen.extend(paths)
        return pl.DataFrame({"image": paths, **{f: ["blue"] * len(paths) for f in families},
                             "world_rmse": [0.5] * len(paths)})

    table = _run(layout, classify=classify).table
    assert len(seen) == 8  # the no-noise run's images only (the others have feature_concepts' predictions)
    # raised no-noise dreams: channels 0 (red) and 1 (green), predicted blue: agreement 0; none recognisable
    assert _metric(table, "dreams_no_noise", "agreement_selective")["value"] == 0.0
    assert _metric(table, "dreams_no_noise", "recognisable")["value"] == 0.0
    without = _run(layout).table
    assert "not measured" in _metric(without, "dreams_no_noise", "agreement_selective")["note"]


def test_contact_sheet_rows_are_the_selective_channels(tmp_path: Path) -> None:
    result = _run(write_root(tmp_path))
    sheet = Image.open(result.out_dir / "contact_sheet.png")
    # 4 selective channels (rows of 32 px + 3 caption lines + 6), a 2-line header; two methods of 2 columns
    assert sheet.size == (132 + 2 * (2 * 36 + 8), 2 * 11 + 8 + 4 * (32 + 3 * 11 + 6))
    pixels = np.asarray(sheet.convert("RGB"))
    top = 2 * 11 + 8  # first row: channel 0 (lowest q), its prior in red at the priors' first column
    assert tuple(pixels[top + 5, 132 + 5]) == (255, 0, 0)


def test_asset_materializes_with_escaped_metadata(tmp_path: Path) -> None:
    import dagster as dg

    from ddr_assets import ALL_ASSETS
    from ddr_assets.visual_benchmark import visual_benchmark
    from ddr_core.records import make_record, read_record, write_record
    from ddr_resources.resources import ComputeResource, DdrStorage

    defs = dg.Definitions(assets=ALL_ASSETS, resources={"storage": DdrStorage(), "compute": ComputeResource()})
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("feature_concepts") in graph.get(dg.AssetKey("visual_benchmark")).parent_keys
    layout = write_root(tmp_path / "data", hostile="![x](http://attacker.example/t.png)")
    no_model = {"ops": {"visual_benchmark": {"config": {"random_latents": 0}}}}  # the synthetic root has none
    result = dg.materialize([visual_benchmark], partition_key="toy-raw", raise_on_error=False, run_config=no_model,
                            resources={"storage": DdrStorage(data_root=str(layout.data_root))})
    assert not result.success  # feature_concepts[toy-raw] has no record yet: named
    write_record(layout.records_dir, make_record("feature_concepts", "toy-raw", "2", {}, {}, "fc-v1"))
    result = dg.materialize([visual_benchmark], partition_key="toy-raw", run_config=no_model,
                            resources={"storage": DdrStorage(data_root=str(layout.data_root))})
    event = result.get_asset_materialization_events()[0].materialization
    meta = {k: v.value for k, v in event.metadata.items()}
    assert "agreement\\_selective" in meta["benchmark"] and meta["selective_channels"] == 4
    assert "gain\\_over\\_unsteered" in meta["benchmark"] and "channels\\_gaining" in meta["benchmark"]
    assert "](http" not in meta["channels_not_visualised"]  # the hostile concept shows as text
    assert meta["upstream_versions"] == {"feature_concepts/toy-raw": "fc-v1"}
    record = read_record(layout.records_dir, "visual_benchmark", "toy-raw")
    assert event.tags["dagster/data_version"] == record["data_version"]
    assert (layout.stage_dir("visual_benchmark", "toy-raw") / "contact_sheet.png").is_file()


DEMO = Path("/tmp/demo-s5")


@pytest.mark.skipif(not (DEMO / "outputs/default/feature_concepts/toy-raw/summary.json").is_file(),
                    reason="no finished `make demo` data root at /tmp/demo-s5")
def test_asset_on_a_copy_of_the_demo(tmp_path: Path) -> None:
    import dagster as dg

    from dagster_project.demo import visual_benchmark_lines
    from ddr_assets.visual_benchmark import visual_benchmark
    from ddr_resources.resources import DdrStorage

    for part in ("feature_concepts", "priors", "dreams", "_records"):
        shutil.copytree(DEMO / "outputs/default" / part, tmp_path / "outputs/default" / part,
                        ignore=shutil.ignore_patterns("steps", "*.safetensors", ".*"))
    shutil.copytree(DEMO / "assets", tmp_path / "assets")  # the model, for the random-latent baseline
    result = dg.materialize([visual_benchmark], partition_key="toy-raw",
                            resources={"storage": DdrStorage(data_root=str(tmp_path))})
    assert result.success
    layout = DataLayout(tmp_path, "default")
    table = pl.read_parquet(layout.stage_dir("visual_benchmark", "toy-raw") / "benchmark.parquet")
    images = pl.read_parquet(layout.stage_dir("visual_benchmark", "toy-raw") / "images.parquet")
    late = images.filter((pl.col("method") == "dreams") & (pl.col("timestep") >= 959))
    assert late.height > 0 and not late["raised"].any()  # the t >= 959 dreams never count as dreams
    assert _metric(table, "dreams", "no_op_dreams_t959")["value"] == late.height
    assert 0 < _metric(table, "dreams", "beats_best_random")["value"] < 1  # measured with the toy model
    # the asset's classifier (used for dreams_no_noise) predicts what feature_concepts saved for the same images
    from ddr_assets.visual_benchmark import classifier_of

    saved = pl.read_parquet(layout.stage_dir("feature_concepts", "toy-raw") / "dream_predictions.parquet").head(12)
    families = ["colour", "shape", "background"]
    again = classifier_of(DdrStorage(data_root=str(tmp_path)), "toy-raw")(saved["image"].to_list(), families)
    assert again.select(families).equals(saved.select(families))
    assert np.allclose(again["world_rmse"].to_numpy(), saved["world_rmse"].to_numpy(), atol=1e-6)
    lines = visual_benchmark_lines(layout, ["toy-raw"])
    assert lines[0].startswith("Visualisation benchmark") and "toy-raw dreams: agreement" in lines[2]
