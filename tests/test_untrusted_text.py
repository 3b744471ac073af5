"""Untrusted text (prompts, labels, file names) in Markdown metadata shows as text, never as markup.

A prompt ``![x](http://attacker.example/...)`` in a Markdown table of the asset's metadata would make
the browser of everyone who opens the asset page in Dagster fetch that URL. The builders escape data
with ``ddr_core.markdown_text.escape_markdown``; these tests render what they produce with a CommonMark
parser (``tests.markdown_check``) and find no image, link, raw HTML or autolink in it, while the text
reads exactly as the data. The inspector's side is in ``tests/test_inspector.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml
from PIL import Image

from tests.markdown_check import HOSTILE, live_markup, rendered_text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_the_check_sees_live_markup() -> None:
    """The checker itself: each hostile string IS live markup when not escaped (so the tests can fail)."""
    for text in HOSTILE[:-2]:
        assert live_markup(text), text
    assert live_markup(HOSTILE[-2]) == []  # formatting only: no URL to fetch, but not the text either
    assert rendered_text(HOSTILE[-2]) != _one_line(HOSTILE[-2])


@pytest.mark.parametrize("text", [*HOSTILE, "a photo of a cat, 3.5 * 2 = 7 (50% off!) #1 {x} ~y~ \\ end",
                                  "", "   ", "\r\n", "unicode: café 東京 ＜img＞"])
def test_escape_markdown_is_inert_and_reads_as_the_text(text: str) -> None:
    from ddr_core.markdown_text import escape_markdown

    escaped = escape_markdown(text)
    assert "\n" not in escaped and "\r" not in escaped
    assert live_markup(escaped) == []
    assert rendered_text(escaped) == _one_line(text)
    # inside a GFM table cell and a sentence as well
    row = f"| # | prompt |\n|---|---|\n| 0 | {escaped} |"
    assert live_markup(row) == [] and rendered_text(row) == _one_line(f"# prompt 0 {text}")
    assert live_markup(f"**bold** {escaped} [ok](/assets/x)") == ["link /assets/x"]


def test_table_preview_of_hostile_prompts() -> None:
    """``table_preview`` (prompt_datasets, timestep_stats, dreams, sweeps metadata)."""
    from ddr_assets.lineage import table_preview

    rows = [{"#": i, "prompt": text, "score": 0.5} for i, text in enumerate(HOSTILE)]
    value = table_preview(rows)
    assert isinstance(value, dg.MarkdownMetadataValue)
    assert live_markup(value.md_str) == []
    assert value.md_str.count("\n") == len(HOSTILE) + 1  # header, delimiter and one line per row
    for text in HOSTILE:
        assert _one_line(text) in rendered_text(value.md_str)
    hostile_header = table_preview([{HOSTILE[0]: 1}])
    assert live_markup(hostile_header.md_str) == []


def test_feature_concepts_markdown_table_of_hostile_labels() -> None:
    from ddr_core.feature_concepts import markdown_table

    rows = [{"source": "prior", "family": text, "rate": 0.25, "channels": None} for text in HOSTILE]
    table = markdown_table(rows)
    assert live_markup(table) == []
    assert table.count("\n") == len(HOSTILE) + 1
    assert "0.250" in table and "| - |" in table  # floats and None keep their format
    assert live_markup(markdown_table([{HOSTILE[1]: "x"}])) == []


def test_image_preview_alt_text_is_escaped(tmp_path: Path) -> None:
    """The preview's one image is the data URL made from the file; a hostile file name is only text."""
    from ddr_assets.activations import image_preview

    path = tmp_path / "x](http:attacker.example) ![y](http:attacker.example.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path, format="PNG")
    markup = live_markup(image_preview([path]).md_str)
    assert len(markup) == 1 and markup[0].startswith("image data:image/png;base64,"), markup


def test_json_md_cannot_be_closed_by_its_content() -> None:
    from ddr_assets.lineage import json_md

    payload = {"prompt": "```\n![x](http://attacker.example/j.png)\n```"}
    md = json_md(payload).md_str
    assert live_markup(md) == []
    assert json.loads(md.split("\n", 1)[1].rsplit("\n", 1)[0]) == payload


def test_prompt_datasets_materialization_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real asset: a prompt dataset of hostile prompts; its metadata preview shows them as text."""
    from ddr_assets.provisioning import prompt_datasets
    from ddr_core.config import DEFAULT_CONFIG_PATH
    from ddr_resources.resources import ComputeResource, DdrStorage

    prompts = tmp_path / "source" / "prompts.jsonl"
    prompts.parent.mkdir()
    prompts.write_text("".join(json.dumps({"text": text}) + "\n" for text in HOSTILE), encoding="utf-8")
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    config["prompt_datasets"]["tiny-prompts"] = {"source": {"local": str(prompts)}, "file": "prompts.jsonl"}
    config_file = tmp_path / "ddr.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setenv("DDR_CONFIG", str(config_file))
    result = dg.materialize(
        [prompt_datasets], partition_key="tiny-prompts", instance=dg.DagsterInstance.ephemeral(),
        resources={"storage": DdrStorage(data_root=str(tmp_path / "data")), "compute": ComputeResource(device="cpu")},
    )
    assert result.success
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    preview = metadata["preview"]
    assert isinstance(preview, dg.MarkdownMetadataValue)
    assert live_markup(preview.md_str) == []
    shown = rendered_text(preview.md_str)
    for text in HOSTILE:
        assert _one_line(text) in shown
    for value in metadata.values():  # no other Markdown entry carries the prompts
        if isinstance(value, dg.MarkdownMetadataValue):
            assert live_markup(value.md_str) == []


def test_image_preview_is_labelled_and_enlarges_tiny_images_pixel_sharp(tmp_path: Path) -> None:
    """Dagster UI previews: each image captioned from ddr's layout (channel / timestep / seed), a 32 px toy image
    enlarged 5x with nearest-neighbour (its pixels stay blocks), a large one shrunk to fit."""
    import base64
    import io
    import re

    from ddr_assets.activations import image_preview

    small = tmp_path / "channel_00012" / "t_0501" / "seed_3.png"
    small.parent.mkdir(parents=True)
    tiny = Image.new("RGB", (32, 32), (0, 0, 0))
    tiny.putpixel((0, 0), (255, 255, 255))
    tiny.save(small)
    large = tmp_path / "sheet.png"
    Image.new("RGB", (640, 320), (0, 0, 255)).save(large)
    md = image_preview([small, (large, "contact | sheet")]).md_str
    header = md.split("\n")[0]
    assert header == "| channel 12\\, t\\=501\\, seed 3 | contact \\| sheet |"  # escaped Markdown text
    images = [Image.open(io.BytesIO(base64.b64decode(m))) for m in re.findall(r"base64,([A-Za-z0-9+/=]+)\)", md)]
    assert [im.size for im in images] == [(160, 160), (160, 80)]
    assert images[0].getpixel((4, 4)) == (255, 255, 255) and images[0].getpixel((5, 5)) == (0, 0, 0)
    assert len(live_markup(md)) == 2
