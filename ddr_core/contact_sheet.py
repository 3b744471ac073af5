"""The visual benchmark's contact sheet: selective channels x method images, labelled, in one PNG.

Rows are channels with a concept verdict (``feature_concepts``), most significant first; per method a group
of columns with up to ``columns`` of its images of that channel (priors: their seeds; dreams: only dreams
the optimiser raised above seed noise, largest gain first). Each row is labelled with the channel and its
concept, each image with the classifier's prediction (and a dream's timestep). Labels are data: they are
drawn as plain text with Pillow's default font, reduced to printable ASCII and cut to the cell's width, so
nothing in them is interpreted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

LINE = 11  # pixel height of a line of Pillow's default font
CHAR = 6  # pixel width of one of its characters
LABEL_WIDTH = 132


def plain_label(text: object, limit: int) -> str:
    """``text`` as printable ASCII (anything else becomes ``?``), cut to ``limit`` characters."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return cleaned if len(cleaned) <= limit else cleaned[: max(limit - 1, 0)] + "~"


def _wrap(text: str, width: int, lines: int) -> list[str]:
    words, out, line = plain_label(text, width * lines * 2).split(" "), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if len(candidate) <= width:
            line = candidate
        else:
            out.append(line)
            line = word[:width]
    out.append(line)
    return [plain_label(x, width) for x in out if x][:lines]


def _rank(table: pl.DataFrame, families: Sequence[str]) -> list[tuple[int, str]]:
    rows = []
    for row in table.filter(pl.col("n_concepts") > 0).iter_rows(named=True):
        qs = [row[f"q_{f}"] for f in families if row.get(f"q_{f}") is not None]
        rows.append((min(qs) if qs else math.inf, int(row["channel"]), row["concept"] or ""))
    return [(channel, concept) for _, channel, concept in sorted(rows)]


def _cells(images: pl.DataFrame, method: str, channel: int, limit: int) -> list[dict]:
    mine = images.filter((pl.col("method") == method) & (pl.col("channel") == channel))
    if "raised" in mine.columns and mine["raised"].is_not_null().any():
        mine = mine.filter(pl.col("raised").fill_null(False)).sort("gain", descending=True, nulls_last=True)
    return mine.head(limit).to_dicts()


def write_contact_sheet(path: str | Path, data_root: str | Path, table: pl.DataFrame, images: pl.DataFrame,
                        families: Sequence[str], *, rows: int = 16, columns: int = 4, cell: int = 64,
                        title: str = "", method_order: Sequence[str] = ()) -> Path:
    """Draw the sheet (see the module docstring) to ``path`` (PNG) and return it. Channels with images of
    some method come first; a sheet without selective channels says so."""
    from PIL import Image, ImageDraw, ImageFont

    from ddr_core.feature_concepts import load_images

    font = ImageFont.load_default()
    present = set(images["method"].to_list()) if images.height and "method" in images.columns else set()
    methods = [m for m in method_order if m in present] + sorted(present - set(method_order))
    ranked = _rank(table, families)
    with_images = {int(c) for c in images["channel"].to_list()} if images.height else set()
    ranked = ([r for r in ranked if r[0] in with_images] + [r for r in ranked if r[0] not in with_images])[:rows]
    caption_lines = len(families) + 1
    row_height = cell + caption_lines * LINE + 6
    width = LABEL_WIDTH + max(len(methods), 1) * (columns * (cell + 4) + 8)
    height = 2 * LINE + 8 + max(len(ranked), 1) * row_height
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max((cell + 2) // CHAR, 4)
    draw.text((4, 2), plain_label(title, width // CHAR), fill="black", font=font)
    for m, method in enumerate(methods):
        left = LABEL_WIDTH + m * (columns * (cell + 4) + 8)
        draw.text((left, 2 + LINE), plain_label(method, columns * chars), fill="black", font=font)
    if not ranked:
        draw.text((4, 2 * LINE + 8), "no channel has a concept verdict (BH q < alpha)", fill="black", font=font)
    for r, (channel, concept) in enumerate(ranked):
        top = 2 * LINE + 8 + r * row_height
        draw.line([(0, top - 2), (width, top - 2)], fill=(200, 200, 200))
        draw.text((4, top), f"channel {channel}", fill="black", font=font)
        for i, line in enumerate(_wrap(concept, LABEL_WIDTH // CHAR - 1, caption_lines + 3)):
            draw.text((4, top + (i + 1) * LINE), line, fill=(60, 60, 60), font=font)
        for m, method in enumerate(methods):
            left = LABEL_WIDTH + m * (columns * (cell + 4) + 8)
            cells = _cells(images, method, channel, columns)
            if not cells:
                empty = "no raised dream" if "dream" in method else "none"
                draw.text((left, top + cell // 2), empty, fill=(150, 0, 0), font=font)
            for c, entry in enumerate(cells):
                x = left + c * (cell + 4)
                array = load_images(data_root, [entry["image"]])[0]
                picture = Image.fromarray(np.asarray(array, dtype=np.uint8)).resize((cell, cell), Image.NEAREST)
                sheet.paste(picture, (x, top))
                caption = [str(entry.get(f) or "?") for f in families]
                if entry.get("timestep") is not None:
                    caption.append(f"t={entry['timestep']}")
                for i, text in enumerate(caption[:caption_lines]):
                    draw.text((x, top + cell + 1 + i * LINE), plain_label(text, chars), fill="black", font=font)
    out = Path(path)
    sheet.save(out, format="PNG")
    return out
