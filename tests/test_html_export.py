"""The static HTML export and the ``ddr`` command line, on hand-made data."""

from __future__ import annotations

import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest

from ddr_core import cli
from ddr_core import representation as rep
from ddr_core.html_export import export_html, svg_chart, write_html_report
from tests.representation_data import (
    VARIANT,
    corrupt_toy_data_root,
    make_toy_data_root,
    write_feature_concepts,
)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.svgs = 0
        self.rows = 0
        self.scripts: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "svg":
            self.svgs += 1
        elif tag == "tr":
            self.rows += 1
        elif tag == "script":
            self.scripts.append(attrs)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture()
def toy(tmp_path: Path):
    toy = make_toy_data_root(tmp_path / "data")
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    return toy


def _check_self_contained(out: Path) -> int:
    """Every image and link of every page resolves to a file inside ``out``; returns the image count."""
    images = 0
    for page in [out / "index.html", *sorted((out / "channels").glob("*.html"))]:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=\"(https?:|file:|/)", text), page
        parsed = _parse(page)
        # in-page anchors and the charts' own SVG downloads (data URLs made by the export) are not files
        for target in parsed.images + [link for link in parsed.links
                                       if not link.startswith(("#", "data:image/svg+xml;base64,"))]:
            resolved = (page.parent / target).resolve()
            assert resolved.is_file(), f"{page.name} -> {target}"
            assert out.resolve() in resolved.parents
        images += len(parsed.images)
    return images


def test_export_writes_a_self_contained_folder(toy, tmp_path: Path) -> None:
    index = export_html(toy.layout, VARIANT, tmp_path / "report")
    out = index.parent
    assert index == (tmp_path / "report" / "index.html").resolve()
    parsed = _parse(index)
    assert parsed.rows == 1 + 4  # header + the 4 active channels
    assert [link for link in parsed.links] == [f"channels/channel_{c:05d}.html" for c in range(4)]
    assert len(parsed.images) == 4  # a thumbnail per channel
    assert parsed.scripts == [{}]  # one inline script, nothing loaded from elsewhere
    assert "data-type=\"num\"" in index.read_text()
    assert sorted(p.name for p in (out / "channels").iterdir()) == [f"channel_{c:05d}.html" for c in range(4)]

    page = (out / "channels" / "channel_00000.html").read_text()
    assert page.count("<svg") == 2
    # each chart downloads as the same SVG the page shows
    downloads = re.findall(r'<a download="([^"]+)" href="data:image/svg\+xml;base64,([^"]+)"', page)
    assert [name for name, _ in downloads] == ["channel_00000_activity.svg", "channel_00000_max_activation.svg"]
    import base64
    assert all(base64.b64decode(data).decode() in page for _, data in downloads)
    # activity chart: 1 peak + 2 visualised timesteps as markers
    assert page.count('class="marker"') == 3
    assert "with schedule noise" in page and "without schedule noise" in page
    assert "failed: non-finite loss" in page
    assert "a castle made of glass" in page
    channel0 = _parse(out / "channels" / "channel_00000.html")
    # 6 examples + noise (3 raised finals + 9 steps; the failed one listed as text) + no-noise (2 finals + 6 steps)
    # + 2 priors
    assert len(channel0.images) == 6 + 12 + 8 + 2
    assert "t=0, seed 22: failed: non-finite loss" in page
    assert "seed 7; vs unsteered: raised (gain 1 vs noise 0.141)" in page  # each prior against the unsteered one
    assert "seed 8; vs unsteered: not raised (gain 0.01 vs noise 0.141)" in page
    assert _check_self_contained(out) > 30
    # sections in reading order with anchors (the dataset examples, possibly hundreds, last), a contents line
    anchors = [page.index(f'<section id="{a}">') for a in ("dreams", "priors", "cfg", "examples")]
    assert anchors == sorted(anchors) and page.index('<nav class="contents">') < anchors[0]
    assert all(f'href="#{a}"' in page for a in ("dreams", "priors", "cfg", "examples"))
    # every column of the channel table explained, in its header's tooltip and in a list under the table
    text = index.read_text()
    assert 'title="mean over the shown dreams of the dream' in text and '<details id="columns">' in text
    assert text.count("<dt>") == 10 and "<dt>dream / top example</dt><dd>mean over the shown dreams" in text

    # relocatable: the copy opens the same way
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    _check_self_contained(moved)


def test_export_refuses_crafted_paths(toy, tmp_path: Path) -> None:
    path = rep.shard_path(toy.layout, VARIANT, 1)
    shard = json.loads(path.read_text())
    shard["priors"]["images"][0]["image"] = "../../etc/passwd"
    shard["examples"][0]["image"] = "/etc/hostname"
    path.write_text(json.dumps(shard))
    index = export_html(toy.layout, VARIANT, tmp_path / "report")
    page = (index.parent / "channels" / "channel_00001.html").read_text()
    assert "prior image unavailable: ../../etc/passwd" in page
    assert "dataset example image unavailable: /etc/hostname" in page
    assert "refused: it escapes the data root" in index.read_text()
    copied = [p.name for p in (index.parent / "files").rglob("*") if p.is_file()]
    assert "passwd" not in copied and "hostname" not in copied
    _check_self_contained(index.parent)


def test_export_without_representation_stage(tmp_path: Path) -> None:
    toy = make_toy_data_root(tmp_path / "data", priors=False, dreams=False)  # shards built in memory
    index = export_html(toy.layout, VARIANT, tmp_path / "report", channels=[2, 4])
    assert _parse(index).rows == 3
    page = (index.parent / "channels" / "channel_00002.html").read_text()
    assert "No deep dreams." in page and "No priors." in page
    assert (index.parent / "channels" / "channel_00004.html").is_file()
    _check_self_contained(index.parent)


def test_svg_chart_reverses_the_timestep_axis() -> None:
    svg = svg_chart([0, 500, 999], [0.0, 1.0, 0.5], 1000, "t", "#000", markers=[(500, 1.0, "red", "peak")],
                    rules=[999], width=1060, height=200)
    points = re.search(r'class="curve" points="([^"]+)"', svg).group(1).split()
    xs = [float(p.split(",")[0]) for p in points]
    assert xs[0] > xs[1] > xs[2]  # timestep 0 at the right
    assert xs[0] == pytest.approx(48 + 1000) and xs[1] == pytest.approx(48 + 500)
    assert 'class="rule"' in svg and 'class="marker"' in svg


def test_cli(toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    command = cli.inspector_command(str(toy.data_root), "default", port=8765)
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4].endswith("inspector_server.py")  # inspector_app.py behind the web guard
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--") + 1:] == ["--data-root", str(toy.data_root), "--experiment", "default"]
    assert cli.main(["export-html", "--data-root", str(toy.data_root), "--variant", VARIANT,
                     "--out", str(tmp_path / "cli-report")]) == 0
    assert (tmp_path / "cli-report" / "index.html").is_file()
    assert cli.main(["build-shards", "--data-root", str(toy.data_root), "--variant", VARIANT]) == 0
    assert capsys.readouterr().out.strip().endswith("index.parquet")
    with pytest.raises(SystemExit):
        cli.main(["export-html", "--data-root", str(toy.data_root)])  # --variant missing


def test_export_shows_the_ground_truth_when_the_variant_was_scored(toy, tmp_path: Path) -> None:
    plain = export_html(toy.layout, VARIANT, tmp_path / "plain").read_text()
    assert "concept (ground truth)" not in plain
    write_feature_concepts(toy.layout)
    index = export_html(toy.layout, VARIANT, tmp_path / "report")
    text = index.read_text()
    assert ('<th data-col="2" data-type="text" title="the concept the channel&#x27;s top prompts share, significant '
            'against the labels permuted among prompts') in text
    assert ">concept (ground truth, BH q &lt; 0.05)</th>" in text and text.count("<dt>") == 12
    # channel 0: selective for its colour (q 0.001), not its shape (q 0.4); channel 1: for nothing
    assert '<td data-value="selective for colour=red">selective for colour=red</td>' in text
    assert '<td data-value="0.875">0.88</td>' in text
    assert '<td data-value="not selective">not selective</td>' in text
    page = (index.parent / "channels" / "channel_00000.html").read_text()
    assert ("Ground truth (4 labelled top examples): <b>selective for colour=red</b> &middot; colour <b>red</b> "
            "(purity 1.00, chance 0.30, q 0.001)") in page
    assert "priors agree: colour 0.50, shape 1.00 (2 images, 0.50 recognisable)" in page
    assert "dreams agree: colour 0.25, shape 0.00 (4 images)" in page
    assert "Ground truth: not scored (1 labelled top examples)" in \
        (index.parent / "channels" / "channel_00002.html").read_text()
    _check_self_contained(index.parent)


def test_bad_shards_and_files_are_skipped_and_listed_and_the_rest_exported(toy, tmp_path: Path, capsys) -> None:
    """One bad shard, image, curve table or index row never aborts the export: each is listed (named, with
    its reason) at the top of index.html and in problems.json, and every good channel is all there."""
    damage = corrupt_toy_data_root(toy.layout)
    report = write_html_report(toy.layout, VARIANT, tmp_path / "report", channels=[0, 1, 2, 3, 4, 99])
    out = report.index.parent
    assert report.channels == [0, 3, 4]
    texts = [p.text() for p in report.problems]
    listed = json.loads((out / "problems.json").read_text())
    assert [f"{p['what']} {p['name']}: {p['reason']}" for p in listed] == texts
    index_page = report.index.read_text()
    assert f"{len(texts)} problem(s)" in index_page

    def problem(*parts: str) -> str:
        found = [t for t in texts if all(part in t for part in parts)]
        assert len(found) == 1, (parts, texts)
        assert html.escape(found[0], quote=True) in index_page  # listed on the index page, as text
        return found[0]

    problem("channel 1", "channel_00001.json", "is not valid JSON (truncated?)", "rebuild it")
    problem("channel 2", "channel_00002.json", "wrong type", "total_timesteps", "peaks")
    problem("channel 99", "cannot be built", "outside 0..5")
    problem("channel 4", "the index lists this shard but it is missing")
    problem("channel 0 curve table", damage["curve table"], "cannot be read", "observed points")
    problem("dream image", damage["corrupt image"], "not a readable image")
    problem("prior image", damage["missing image"], "is missing")
    problem("dataset example image ../../etc/passwd", "escapes the data root")
    problem("dataset example image", "\\x00", "NUL byte")  # escaped, never the raw byte
    problem("dataset example image", "(312 characters)", "File name too long")
    assert "\x00" not in index_page and "n" * 200 not in index_page

    # the good channels are all there: full pages (both charts, their images), linked from the table
    for channel in (0, 3, 4):
        page = (out / "channels" / f"channel_{channel:05d}.html").read_text()
        assert page.count("<svg") == 2, channel
    channel0 = _parse(out / "channels" / "channel_00000.html")
    assert len(channel0.images) == (6 + 12 + 8 + 2) - 3  # all but the corrupt, the missing and the refused one
    assert "cannot be read" in (out / "channels" / "channel_00000.html").read_text()
    # the skipped channels have a page that says why, so the table's links and the neighbours' links work
    for channel in (1, 2, 99):
        assert "could not be exported" in (out / "channels" / f"channel_{channel:05d}.html").read_text()
    assert _parse(report.index).rows == 1 + 6
    _check_self_contained(out)

    # the command line lists the problems and exits with 1, having written the report
    assert cli.main(["export-html", "--data-root", str(toy.data_root), "--variant", VARIANT,
                     "--out", str(tmp_path / "cli-report")]) == 1
    err = capsys.readouterr().err
    assert "problem: channel 1 " in err and "problem(s), listed at the top of" in err
    assert (tmp_path / "cli-report" / "channels" / "channel_00000.html").is_file()


def test_unreadable_index_and_ground_truth_tables_are_replaced_and_listed(toy, tmp_path: Path) -> None:
    from ddr_core.feature_concepts import TABLE_FILE, feature_concepts_dir

    write_feature_concepts(toy.layout)
    truth = feature_concepts_dir(toy.layout, VARIANT) / TABLE_FILE
    truth.write_bytes(truth.read_bytes()[:30])
    index_file = rep.representation_dir(toy.layout, VARIANT) / "index.parquet"
    index_file.write_bytes(b"PAR1 not really")
    report = write_html_report(toy.layout, VARIANT, tmp_path / "report")
    texts = [p.text() for p in report.problems]
    assert report.channels == [0, 1, 2, 3]  # the index rebuilt from the statistics
    assert any(t.startswith(f"index {index_file}: ") and "rebuilt in memory" in t for t in texts), texts
    assert any(t.startswith("ground truth ") and "cannot be read" in t for t in texts), texts
    assert "concept (ground truth" not in report.index.read_text()
    # wrong column types in an index that reads fine: the same
    pl.DataFrame({"channel": ["a", "b"], "is_active": [True, True]}).write_parquet(index_file)
    report = write_html_report(toy.layout, VARIANT, tmp_path / "report2")
    assert report.channels == [0, 1, 2, 3]
    assert any("lacks the column(s)" in p.text() for p in report.problems)


def test_export_shows_the_dose_response_grid_and_effects(toy, tmp_path: Path) -> None:
    from tests.dose_data import HOSTILE_CONCEPT, write_dose_grid

    write_dose_grid(toy.layout, VARIANT, 0)
    index = export_html(toy.layout, VARIANT, tmp_path / "report")
    text = index.read_text()
    assert "Steering dose-response: the causal test (1 channel(s))" in text
    assert "<td>inside-outside</td><td>x1</td><td>0.700</td>" in text
    page = (index.parent / "channels" / "channel_00000.html").read_text()
    assert "<h2>Steering dose-response</h2>" in page and html.escape(HOSTILE_CONCEPT) in page
    assert HOSTILE_CONCEPT not in page  # escaped, never markup
    assert page.count('alt="dose-response image"') == 7
    assert "No dose-response grid" in (index.parent / "channels" / "channel_00001.html").read_text()
    _check_self_contained(index.parent)
