"""The Streamlit inspector driven by ``streamlit.testing.v1.AppTest`` on hand-made data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

pytest.importorskip("streamlit", reason="streamlit is not installed: pip install streamlit")
from streamlit import config as streamlit_config  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from ddr_core import representation as rep  # noqa: E402
from ddr_core.feature_concepts import TABLE_FILE, feature_concepts_dir  # noqa: E402
from tests.markdown_check import HOSTILE, live_markup, rendered_text  # noqa: E402
from tests.representation_data import (  # noqa: E402
    OBSERVED,
    VARIANT,
    WIDTH,
    corrupt_toy_data_root,
    make_toy_data_root,
    write_feature_concepts,
)

APP = str(Path(__file__).resolve().parents[1] / "ddr_core" / "inspector_app.py")
# As `ddr inspect` runs it: no "magic" (Streamlit would build a Python AST of the script in its runner
# thread, which CPython 3.11.7 intermittently fails to do: "AST constructor recursion depth mismatch").
streamlit_config.set_option("runner.magicEnabled", False)


@pytest.fixture()
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    toy = make_toy_data_root(tmp_path / "data")
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    monkeypatch.setenv("DDR_DATA_ROOT", str(toy.data_root))
    monkeypatch.setenv("DDR_EXPERIMENT", "default")
    monkeypatch.setenv("DDR_DAGSTER_URL", "http://dagster.example:3000/")
    return toy


def _settled(at: AppTest) -> AppTest:
    """Run again when a run rendered nothing. CPython 3.11.7 intermittently fails to compile the
    script in Streamlit's runner thread ("AST constructor recursion depth mismatch", a CPython bug);
    the app then renders nothing. A blank page is never a valid state of the inspector (it always
    shows its title), so a retry cannot hide an app bug."""
    for _ in range(3):
        if at.title:
            break
        at.run()
    assert at.title, "the inspector rendered nothing"
    assert not at.exception, [e.value for e in at.exception]
    return at


def _app() -> AppTest:
    return _settled(AppTest.from_file(APP, default_timeout=180).run())


def _run(action) -> AppTest:
    """Run the app after a widget action (``at.button(...).click()``) or run ``at`` again."""
    return _settled(action.run())


def _chart_layers(at: AppTest, index: int) -> list[tuple[str, pa.Table]]:
    """``(mark type, data)`` of each layer of the ``index``-th chart."""
    proto = at.get("vega_lite_chart")[index].proto
    data = {d.name: pa.ipc.open_stream(d.data.data).read_all() for d in proto.datasets}
    layers = []
    for layer in json.loads(proto.spec)["layer"]:
        mark = layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]
        layers.append((mark, data[layer["data"]["name"]]))
    return layers


def _texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def _shown(elements) -> list[str]:
    """What the reader sees of Markdown elements (data in them is escaped Markdown)."""
    return [rendered_text(str(e.value)) for e in elements]


# Fields Streamlit renders as Markdown (st.text and st.code bodies are plain text).
_MARKDOWN_FIELDS = ("body", "label", "help", "caption", "placeholder")
_PLAIN_ELEMENTS = ("text", "code")


def _markdown_sources(at: AppTest) -> list[tuple[str, str]]:
    """``(element type, source)`` of every string of the page that Streamlit renders as Markdown."""
    found: list[tuple[str, str]] = []

    def walk(kind: str, message) -> None:
        for field, value in message.ListFields():
            repeated = hasattr(value, "__iter__") and not isinstance(value, str | bytes) and not hasattr(value, "ListFields")
            values = value if repeated else [value]
            for item in values:
                if isinstance(item, str):
                    if field.name in _MARKDOWN_FIELDS or (kind == "radio" and field.name == "options"):
                        found.append((kind, item))
                elif hasattr(item, "ListFields"):
                    walk(kind, item)

    for block in (at.main, at.sidebar):
        for node in block:
            if getattr(node, "proto", None) is not None and node.type not in _PLAIN_ELEMENTS:
                walk(node.type, node.proto)
    return found


def test_start_shows_first_active_channel_at_its_top_peak(toy) -> None:
    at = _app()
    channel = at.selectbox(key="channel")
    assert channel.value == 0
    assert channel.options == [f"channel {c:05d}" for c in (0, 1, 2, 3)]  # inactive 4 and 5 are hidden
    assert at.session_state["timestep"] == 501
    assert at.number_input(key="timestep_input").value == 501
    assert len(at.get("vega_lite_chart")) == 2
    assert [t.label for t in at.tabs] == ["Visualisation", "Dataset examples", "Priors", "Where it fires",
                                          "Dose-response", "Text vs image (CFG halves)", "Label",
                                          "Across models"]
    # activity chart: reversed timestep axis, markers (peak + visualised timesteps) and the current-timestep rule
    layers = _chart_layers(at, 0)
    assert [mark for mark, _ in layers] == ["area", "line", "point", "point", "rule"]
    assert json.loads(at.get("vega_lite_chart")[0].proto.spec)["layer"][0]["encoding"]["x"]["scale"] == {
        "domain": [1000, 0]}
    assert layers[0][1].num_rows == 1000
    markers = layers[3][1].to_pydict()
    assert list(zip(markers["timestep"], markers["kind"], strict=True)) == [
        (501, "visualised"), (0, "visualised"), (501, "peak #1")]
    assert layers[4][1].to_pydict()["timestep"] == [501]
    assert _chart_layers(at, 1)[-1][1].to_pydict()["timestep"] == [501]  # same rule on the max chart
    assert at.selectbox(key="data_timestep").options == ["t=701", "t=501 (dreams)", "t=301", "t=0 (dreams)"]
    links = "".join(_texts(at.sidebar.markdown))
    assert "http://dagster.example:3000/assets/representation_shards" in links


def test_channel_navigation_and_peak_jump(toy) -> None:
    at = _app()
    _run(at.button(key="next_channel").click())
    assert at.selectbox(key="channel").value == 1
    assert at.session_state["timestep"] == 950  # channel 1's top peak
    _run(at.button(key="prev_channel").click())
    _run(at.button(key="prev_channel").click())
    assert at.selectbox(key="channel").value == 3  # wraps around
    assert at.session_state["timestep"] == 101
    peak_labels = [b.label for b in at.sidebar.button if b.key.startswith("peak_")]
    assert peak_labels == ["Peak #1: t=101 (height 0.50)", "Peak #2: t=950 (height 0.10)"]
    _run(at.button(key="peak_1").click())
    assert at.session_state["timestep"] == 950
    assert at.number_input(key="timestep_input").value == 950
    _run(at.selectbox(key="channel").select(2))
    assert at.session_state["timestep"] == 0


def test_timestep_selection(toy) -> None:
    at = _app()
    _run(at.selectbox(key="data_timestep").set_value(701))
    assert at.session_state["timestep"] == 701
    assert at.number_input(key="timestep_input").value == 701
    _run(at.number_input(key="timestep_input").set_value(640))
    assert at.session_state["timestep"] == 640
    examples_tab = at.tabs[1]
    assert "nearest observed timestep to 640" in "".join(_texts(examples_tab.markdown))  # 701 is nearest
    _run(at.slider(key="profile_height").set_value(500))
    assert json.loads(at.get("vega_lite_chart")[0].proto.spec)["height"] == 500


def test_visualisation_tab_runs_seeds_and_steps(toy) -> None:
    at = _app()
    tab = at.tabs[0]
    assert at.radio(key="dream_run").options == ["with schedule noise", "without schedule noise"]
    assert _texts(tab.subheader) == ["final result"]
    assert len(tab.get("image")) == 1
    assert tab.metric[0].value == "9.5000"
    _run(at.selectbox(key="dream_seed").set_value(22))
    slider = at.slider(key="dream_step_noise_501_22")
    assert slider.value == 3 and slider.max == 3
    _run(slider.set_value(1))
    tab = at.tabs[0]
    assert _texts(tab.subheader) == ["step 5"]
    assert tab.metric[0].value == "5.2200"  # stats of step 5 of seed 22
    _run(at.radio(key="dream_run").set_value("no_noise"))
    assert _texts(at.tabs[0].subheader)[0] in ("final result", "step 5")
    assert len(at.tabs[0].get("image")) == 1
    # timestep 0 holds a failed element: not a dream, listed as plain text with its reason
    _run(at.selectbox(key="data_timestep").set_value(0))
    _run(at.radio(key="dream_run").set_value("noise"))
    assert at.selectbox(key="dream_seed").options == ["11"]
    assert "t=0, seed 22: failed: non-finite loss" in "".join(_texts(at.tabs[0].text))
    # a timestep without dreams
    _run(at.number_input(key="timestep_input").set_value(700))
    assert any("No visualisation at timestep 700" in text for text in _texts(at.tabs[0].info))


def test_examples_and_priors_tabs(toy) -> None:
    at = _app()
    examples = at.tabs[1]
    assert "2 dataset examples at timestep 501" in "".join(_texts(examples.markdown))
    assert len(examples.get("image")) == 2
    shard = rep.load_shard(toy.layout, VARIANT, 0)
    assert _texts(examples.text) == [e["prompt"] for e in shard["examples"] if e["timestep"] == 501]
    priors = at.tabs[2]
    assert len(priors.get("image")) == 2
    captions = [image.caption for element in priors.get("image") for image in element.proto.imgs]
    assert all("\\(" in caption for caption in captions)  # escaped Markdown: shown as text
    assert [caption.replace("\\", "") for caption in captions] == [
        "seed 7; vs unsteered: raised (gain 1 vs noise 0.141)", "seed 8; vs unsteered: not raised (gain 0.01 vs noise 0.141)"]
    _run(at.selectbox(key="channel").select(2))
    assert any("No priors" in text for text in _texts(at.tabs[2].info))
    assert any("No deep dreams" in text for text in _texts(at.tabs[0].info))


def test_sort_filter_and_search(toy) -> None:
    at = _app()
    _run(at.selectbox(key="sort_by").set_value("peak timestep"))
    assert at.selectbox(key="channel").options[:2] == ["channel 00001", "channel 00000"]  # 950, 501, ...
    _run(at.checkbox(key="only_dreams").check())
    assert at.selectbox(key="channel").options == ["channel 00000"]
    _run(at.checkbox(key="only_dreams").uncheck())
    _run(at.text_input(key="search").input("submarine"))
    expected = rep.search_channels(toy.layout, VARIANT, "submarine")["channel"].to_list()
    assert sorted(int(o.split()[-1]) for o in at.selectbox(key="channel").options) == sorted(expected)
    _run(at.text_input(key="search").input("no such prompt"))
    assert any("No active channel matches" in text for text in _texts(at.sidebar.warning))


def test_crafted_path_in_a_shard_is_refused(toy) -> None:
    baseline = len(_app().tabs[1].get("image"))
    path = rep.shard_path(toy.layout, VARIANT, 0)
    shard = json.loads(path.read_text())
    for example in shard["examples"]:
        if example["timestep"] == 501 and example["rank"] == 0:
            example["image"] = "../../etc/passwd"
    path.write_text(json.dumps(shard))
    at = _app()
    warnings = _shown(at.tabs[1].warning)
    assert any("'../../etc/passwd' refused: it escapes the data root" in w for w in warnings)
    assert len(at.tabs[1].get("image")) == baseline - 1


def test_bad_shards_and_files_are_warnings_and_the_other_channels_stay(toy) -> None:
    """A truncated or mistyped shard, a shard that cannot be built, an unreadable curve table and images that
    are corrupt, missing, refused, or have a NUL byte or an over-long name: each is a warning naming it, never
    an exception, and every other channel (and the rest of the page) is shown."""
    damage = corrupt_toy_data_root(toy.layout)
    at = _app()  # channel 0: its curve table, a dream image and a prior image are bad
    assert at.selectbox(key="channel").options == [f"channel {c:05d}" for c in (0, 1, 2, 3, 99)]
    assert len(at.get("vega_lite_chart")) == 2  # drawn from the observed points
    main = _shown(at.main.warning)
    assert any(damage["curve table"] in w and "observed points" in w for w in main), main
    assert any(damage["corrupt image"] in w and "not a readable image" in w for w in _shown(at.tabs[0].warning))
    assert any(damage["missing image"] in w and "is missing" in w for w in _shown(at.tabs[2].warning))
    assert len(at.tabs[2].get("image")) == 1  # the other prior

    for channel, reason in ((1, "is not valid JSON"), (2, "has fields of the wrong type"),
                            (99, "cannot be built from the upstream stages")):
        at = _run(at.selectbox(key="channel").select(channel))
        warnings = _shown(at.main.warning)
        assert any(f"channel {channel} cannot be shown" in w and reason in w for w in warnings), warnings
        assert at.selectbox(key="channel").options[-1] == "channel 00099"  # the others are still reachable

    at = _run(at.selectbox(key="channel").select(3))
    at = _run(at.number_input(key="timestep_input").set_value(901))
    warnings = _shown(at.tabs[1].warning)
    assert any("\\x00" in w and "NUL byte" in w for w in warnings), warnings  # escaped, not the raw byte
    assert any("(312 characters)" in w and "File name too long" in w for w in warnings), warnings
    assert not at.tabs[1].get("image") and len(at.get("vega_lite_chart")) == 2


def test_an_unreadable_index_is_rebuilt_with_a_warning(toy) -> None:
    index_file = rep.representation_dir(toy.layout, VARIANT) / "index.parquet"
    index_file.write_bytes(b"PAR1 not really")
    at = _app()
    assert any(str(index_file) in w and "rebuilt in memory" in w for w in _shown(at.sidebar.warning))
    assert at.selectbox(key="channel").options == [f"channel {c:05d}" for c in (0, 1, 2, 3)]


def test_works_from_statistics_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toy = make_toy_data_root(tmp_path / "data", priors=False, dreams=False)  # no shards, no index
    monkeypatch.setenv("DDR_DATA_ROOT", str(toy.data_root))
    at = _app()
    assert at.selectbox(key="channel").options == [f"channel {c:05d}" for c in (0, 1, 2, 3)]
    assert len(at.get("vega_lite_chart")) == 2
    assert len(at.tabs[1].get("image")) == 2


def test_empty_data_root_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDR_DATA_ROOT", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert "Materialize timestep_stats" in at.error[0].value


def test_on_real_demo_output_if_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set DDR_TEST_DEMO_ROOT to a data root made by `python -m dagster_project.demo` to run this."""
    root = os.environ.get("DDR_TEST_DEMO_ROOT")
    if not root or not (Path(root) / "outputs").is_dir():
        pytest.skip("DDR_TEST_DEMO_ROOT is not set to a demo data root")
    monkeypatch.setenv("DDR_DATA_ROOT", root)
    at = _app()
    assert len(at.selectbox(key="channel").options) > 0
    assert len(at.get("vega_lite_chart")) == 4  # activity, max, the CFG tab's two
    _run(at.button(key="next_channel").click())
    peak_buttons = [b for b in at.sidebar.button if b.key.startswith("peak_")]
    if peak_buttons:
        _run(peak_buttons[-1].click())
    assert len(at.tabs[1].get("image")) > 0


def test_on_the_tiny_models_output(tiny_graph, monkeypatch: pytest.MonkeyPatch) -> None:
    """Navigation, a peak jump and each tab on what the asset graph made from the tiny model."""
    data_root, _, results = tiny_graph
    monkeypatch.setenv("DDR_DATA_ROOT", str(data_root))
    monkeypatch.setenv("DDR_EXPERIMENT", "default")
    at = _app()
    if at.selectbox(key="variant").value != "tiny-raw":
        at = _run(at.selectbox(key="variant").set_value("tiny-raw"))
    channels = at.selectbox(key="channel").options
    assert len(channels) > 1 and len(at.get("vega_lite_chart")) == 4  # activity, max, the CFG tab's two
    first = at.selectbox(key="channel").value
    at = _run(at.button(key="next_channel").click())
    assert at.selectbox(key="channel").value != first
    at = _run(at.button(key="prev_channel").click())
    assert at.selectbox(key="channel").value == first
    peak_buttons = [b for b in at.sidebar.button if b.key.startswith("peak_")]
    assert peak_buttons, "the channel has activity peaks"
    at = _run(peak_buttons[-1].click())
    assert at.session_state["timestep"] == at.number_input(key="timestep_input").value
    assert [t.label for t in at.tabs] == ["Visualisation", "Dataset examples", "Priors", "Where it fires",
                                          "Dose-response", "Text vs image (CFG halves)", "Label",
                                          "Across models"]
    assert len(at.tabs[1].get("image")) > 0  # dataset examples: generated images with prompts
    dreamed = results[("dreams", "tiny-raw:0-15")]["channels_done"]
    assert dreamed >= 1
    # a dreamed channel shows its dream and its priors
    for channel in (0, 1, 2):
        label = f"channel {channel:05d}"
        if label in at.selectbox(key="channel").options:
            at = _run(at.selectbox(key="channel").set_value(channel))
            if at.tabs[0].get("image") and at.tabs[2].get("image"):
                break
    assert len(at.tabs[0].get("image")) > 0 and len(at.tabs[2].get("image")) > 0


def test_ground_truth_labels_and_purity_sort(toy) -> None:
    at = _app()
    assert not any("Ground truth" in text for text in _texts(at.markdown))  # no feature_concepts yet
    write_feature_concepts(toy.layout)
    at = _app()
    texts = [t for t in _shown(at.markdown) if "Ground truth" in t]
    assert len(texts) == 1
    assert "selective for colour=red · colour red (purity 1.00, chance 0.30, q 0.00)" in texts[0]
    assert "shape circle (purity 0.75" in texts[0]
    assert texts[0].startswith("Ground truth (4 labelled top prompts at t=501): selective for colour=red")
    assert "priors agree: colour 0.50, shape 1.00 (2 images, 0.50 recognisable)" in texts[0]
    assert "dreams agree: colour 0.25, shape 0.00 (4 images)" in texts[0]
    _run(at.button(key="next_channel").click())
    texts = [t for t in _texts(at.markdown) if "Ground truth" in t]
    assert "colour **blue**" in texts[0] and "priors: none" in texts[0]
    _run(at.selectbox(key="channel").select(2))
    assert any("not scored (1 labelled top examples, needs 3)" in t for t in _texts(at.markdown))
    assert "concept purity (ground truth)" in at.selectbox(key="sort_by").options
    _run(at.selectbox(key="sort_by").set_value("concept purity (ground truth)"))
    assert at.selectbox(key="channel").options[:2] == ["channel 00000", "channel 00001"]  # 0.875, 0.5, then unscored


def test_hostile_text_in_the_data_shows_as_text(toy) -> None:
    """Prompts, concept labels, failure messages and file names from the data never become Markdown
    images, links or HTML (a viewer's browser would fetch ``attacker.example``): the prompt is plain
    ``st.text``, the rest escaped Markdown that reads as the data."""
    prompt = "\n".join(HOSTILE)
    path = rep.shard_path(toy.layout, VARIANT, 0)
    shard = json.loads(path.read_text())
    for example in shard["examples"]:
        if example["timestep"] == 501 and example["rank"] == 0:
            example["prompt"] = prompt
    result = shard["dreams"]["noise"]["results"][0]
    assert result["timestep"] == 501  # the element the Visualisation tab opens with
    result.update(failed=True, failure_reason=HOSTILE[0])
    shard["errors"] = [{"what": HOSTILE[1], "file": HOSTILE[2], "problem": HOSTILE[3]}]
    shard["priors"].update(status="skipped", reason=HOSTILE[4], message=HOSTILE[5])
    path.write_text(json.dumps(shard))
    write_feature_concepts(toy.layout)
    table_path = feature_concepts_dir(toy.layout, VARIANT) / TABLE_FILE
    label = pl.when(pl.col("channel") == 0).then(pl.lit(HOSTILE[6])).otherwise(pl.col("dominant_colour"))
    pl.read_parquet(table_path).with_columns(label.alias("dominant_colour")).write_parquet(table_path)

    at = _app()
    sources = _markdown_sources(at)
    live = [(kind, markup) for kind, source in sources for markup in live_markup(source) if "attacker" in markup]
    assert live == []
    assert prompt in _texts(at.tabs[1].text)  # the prompt itself, as plain text
    shown = " ".join(rendered_text(source) for _, source in sources)
    for text in HOSTILE[:7]:  # everything else reads as the data
        assert " ".join(text.split()) in shown, text
    assert any("optimisation failed: " + HOSTILE[0] in text for text in _shown(at.tabs[0].error))
    assert any(HOSTILE[6].split("\n")[0] in text for text in _shown(at.markdown))  # the concept label


@pytest.mark.parametrize("url", ["http://x.example/)![i](http://attacker.example/u.png", "javascript:alert(1)",
                                 "http://x.example/ [a](http://attacker.example/)"])
def test_a_malformed_dagster_url_is_not_made_a_link(toy, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("DDR_DAGSTER_URL", url)
    at = _app()
    live = [m for _, source in _markdown_sources(at) for m in live_markup(source)]
    assert [m for m in live if "attacker" in m or "javascript" in m] == []
    assert any("DDR_DAGSTER_URL is not a plain" in text for text in _texts(at.sidebar.warning))


def test_cfg_halves_tab_shows_both_halves_and_the_contrast(toy, tmp_path) -> None:
    """The "Text vs image" tab: before cfg_contrast ran it says how to make it; after, both halves' profiles
    (one chart), the difference with its band (another) and the channel's sentence as plain text."""
    from ddr_core.activation_store import ActivationStore, VariantBatch
    from ddr_core.cfg_contrast import compute_cfg_contrast

    at = _app()
    assert any("not computed (materialize cfg_contrast)" in t for t in _texts(at.text))
    store = ActivationStore(tmp_path / "capture")
    rng = np.random.default_rng(0)
    rows = [{"generation_id": g, "prompt_index": g, "prompt": f"p{g}", "image_index": 0, "seed": g,
             "image_path": f"images/{g}.png"} for g in range(6)]
    uncond = rng.normal(size=(6, len(OBSERVED), WIDTH)).astype(np.float32)
    store.write_batch(0, rows, OBSERVED, {VARIANT: VariantBatch(uncond + 2.0, uncond)})
    store.finalize()
    compute_cfg_contrast(store, VARIANT, toy.layout.stage_dir("cfg_contrast", VARIANT))
    at = _app()
    sentences = [t for t in _texts(at.text) if t.startswith("Conditional vs unconditional")]
    assert len(sentences) == 1 and "(text-driven)" in sentences[0] and "over 6 prompts" in sentences[0]
    assert len(at.tabs[5].get("vega_lite_chart")) == 2 and len(at.get("vega_lite_chart")) == 4


def test_the_url_opens_a_channel_and_follows_the_page(toy) -> None:
    """``?variant=&channel=&t=`` opens that channel at that timestep; the URL then follows what is shown (a
    bookmark or a sent link reopens it); a channel that does not exist falls back to the first."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"variant": VARIANT, "channel": "1", "t": "301", "token": "kept"})
    at = _settled(at.run())
    assert at.selectbox(key="channel").value == 1 and at.session_state["timestep"] == 301
    def param(name: str) -> str:
        value = at.query_params[name]
        return value[-1] if isinstance(value, list) else value

    assert (param("channel"), param("t"), param("token")) == ("1", "301", "kept")
    _run(at.button(key="next_channel").click())
    assert param("channel") == str(at.selectbox(key="channel").value) != "1" and param("token") == "kept"
    assert param("t") == str(at.session_state["timestep"])
    first = AppTest.from_file(APP, default_timeout=180)
    first.query_params.update({"variant": "nope", "channel": "999"})
    first = _settled(first.run())
    assert first.selectbox(key="variant").value == VARIANT and first.selectbox(key="channel").value == 0


def test_dose_response_tab(toy) -> None:
    """The channel's steering grid (images by window and strength, means) and the variant's causal-test effects;
    the concept label (hostile text) shows as plain text."""
    from tests.dose_data import HOSTILE_CONCEPT, write_dose_grid

    at = _app()
    assert [t.label for t in at.tabs][4] == "Dose-response"
    assert any("No dose-response grid" in text for text in _texts(at.tabs[4].info))
    write_dose_grid(toy.layout, VARIANT, at.selectbox(key="channel").value)
    at = _run(at)
    tab = at.tabs[4]
    assert len(tab.get("image")) == 7  # unsteered + 3 windows x 2 strengths, first seed
    texts = _texts(tab.text)
    assert any(HOSTILE_CONCEPT in text and "inside window t=400..600" in text for text in texts)
    assert any("Causal test over the variant's 1 channel(s)" in text for text in texts)
    effects = tab.dataframe[1].value
    row = effects[(effects["contrast"] == "inside-outside") & (effects["metric"] == "concept_prob")].iloc[0]
    assert row["difference"] == "0.700" and row["channels up"] == "1/1"


def test_compare_shows_another_channel_beside_this_one(toy) -> None:
    """The compare toggle: another channel's activity profile on the same axis and its top examples (prompts as
    text) beside the shown channel; off by default (no extra chart)."""
    at = _app()
    assert len(at.get("vega_lite_chart")) == 2
    images, texts = len(at.get("image")), len(at.text)
    at = _run(at.toggle(key="compare").set_value(True))
    assert len(at.get("image")) - images == len(at.text) - texts > 0  # its examples: an image and a prompt each
    assert at.selectbox(key="compare_variant").value == VARIANT
    other = at.selectbox(key="compare_channel").value
    assert other != at.selectbox(key="channel").value
    charts = at.get("vega_lite_chart")
    assert len(charts) == 3 and f"{VARIANT} channel {other}" in charts[2].proto.spec
    at = _run(at.selectbox(key="compare_channel").select(2))
    assert f"{VARIANT} channel 2" in at.get("vega_lite_chart")[2].proto.spec
