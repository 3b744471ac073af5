"""Progress lines: counts, rate, plural units."""

from ddr_core.progress import Progress, plural


def test_progress_lines_use_the_plural_of_the_unit() -> None:
    assert [plural(u) for u in ("batch", "image", "channel", "box")] == ["batches", "images", "channels", "boxes"]
    lines: list[str] = []
    with Progress(5, "capture toy", log=lines.append, unit="batch") as progress:
        progress.update(2)
    assert lines and "capture toy: 2/5 batches" in lines[-1]
    assert "batchs" not in " ".join(lines)
