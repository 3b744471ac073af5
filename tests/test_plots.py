import numpy as np
import pytest
from PIL import Image

from ddr_core.activation_store import ActivationStore, VariantBatch
from ddr_core.plots import plot_channel_activity, render_channel_figure, save_activity_figure
from ddr_core.statistics import TimestepStatsConfig, compute_timestep_stats, interpolate_profile

TIMESTEPS = [950, 850, 750, 650, 550, 450, 350, 250, 150, 50]


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    """Top-1 statistics of 4 generations, 3 channels. Channel 0 has four peaks, 974 (edge plateau),
    750, 550, 350, of which the top 3 are kept; channel 1 wins wherever channel 0 does not; channel 2
    is never in the top-1 (no peaks)."""
    root = tmp_path_factory.mktemp("plots")
    cond = np.zeros((4, len(TIMESTEPS), 3), dtype=np.float32)
    cond[:, :, 1] = 1.0
    cond[:, :, 2] = -5.0
    for t, count in {950: 4, 750: 3, 550: 2, 350: 1}.items():
        cond[:count, TIMESTEPS.index(t), 0] = 5.0
    store = ActivationStore(root / "capture")
    for batch_index in range(2):
        rows = []
        for g in range(batch_index * 2, batch_index * 2 + 2):
            rows.append({"generation_id": g, "prompt_index": g, "prompt": f"a photo number {g}", "image_index": 0,
                         "seed": g, "image_path": f"images/{g}.png"})
            (root / "images").mkdir(exist_ok=True)
            Image.new("RGB", (32, 32), (60 * g, 100, 200)).save(root / "images" / f"{g}.png")
        store.write_batch(batch_index, rows, TIMESTEPS,
                          {"raw": VariantBatch(cond[batch_index * 2: batch_index * 2 + 2])})
    store.finalize()
    out = root / "stats"
    compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=1))
    return root, out


def test_plot_channel_with_no_peaks_returns_image():
    profile = np.zeros(1000)
    image = plot_channel_activity(
        channel=7,
        profile_points=(np.array([900, 500, 100]), np.zeros(3)),
        interpolated=profile,
        peaks=[],
        max_activation_curve=(np.array([900, 500, 100]), np.array([0.1, 0.2, 0.0])),
        current_peak=None,
        example_image=None,
        example_prompt=None,
    )
    assert image.mode == "RGB" and image.size[0] > 500 and image.size[1] > 300
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 10  # something was drawn


def test_plot_shows_example_image():
    profile = interpolate_profile(np.array([900, 500, 100]), np.array([0.0, 1.0, 0.0]), 1000)
    common = dict(channel=1, profile_points=(np.array([900, 500, 100]), np.array([0.0, 1.0, 0.0])),
                  interpolated=profile, peaks=[(500, 1.0)],
                  max_activation_curve=(np.array([900, 500, 100]), np.array([0.0, 3.0, 1.0])), current_peak=500)
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    with_image = np.asarray(plot_channel_activity(**common, example_image=red, example_prompt="a red square"))
    without = np.asarray(plot_channel_activity(**common, example_image=None, example_prompt="a red square"))
    pure_red = lambda a: int(((a[..., 0] == 255) & (a[..., 1] == 0) & (a[..., 2] == 0)).sum())  # noqa: E731
    assert pure_red(with_image) > 1000 and pure_red(without) < 100


def test_render_one_frame_per_peak_and_save_gif(stats, tmp_path):
    root, out = stats
    frames = render_channel_figure(out, 0, image_root=root)
    assert len(frames) == 3  # top_peak_count
    path = save_activity_figure(frames, tmp_path / "channel_0000", duration_ms=1500)
    assert path.name == "channel_0000.gif"
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3
        assert gif.info.get("loop") == 0 and gif.info.get("duration") == 1500


def test_channel_without_peaks_saves_png(stats, tmp_path):
    root, out = stats
    frames = render_channel_figure(out, 2, image_root=root)
    assert len(frames) == 1
    path = save_activity_figure(frames, tmp_path / "channel_0002")
    assert path.name == "channel_0002.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == frames[0].size


def test_missing_example_image_and_bad_channel(stats, tmp_path):
    root, out = stats
    frames = render_channel_figure(out, 0, image_root=tmp_path / "nowhere")  # images not found
    assert len(frames) == 3
    with pytest.raises(ValueError, match="outside 0..2"):
        render_channel_figure(out, 3, image_root=root)
    with pytest.raises(ValueError, match="no frames"):
        save_activity_figure([], tmp_path / "x")


KEEP_CLAIM = """
import sys, time
from ddr_core.locks import claim_channels
with claim_channels(sys.argv[1], [0], owner="plots run A"):
    print("claimed", flush=True)
    time.sleep(120)
"""


def test_write_channel_figures_claims_cleans_and_replaces(stats, tmp_path, monkeypatch):
    """The stage writer: one figure per channel; a channel held by another live run fails at once naming
    it; a killed run's temporaries of its channels go; a GIF that is now a PNG does not linger; disk full
    keeps the previous figure and leaves no temporary."""
    import errno
    import subprocess
    import sys
    from pathlib import Path

    from ddr_core import atomic
    from ddr_core.locks import ChannelsLockedError
    from ddr_core.plots import write_channel_figures
    from tests.test_failure_modes import FaultyOs

    root, out = stats
    figures = tmp_path / "activity_plots" / "raw"
    written = write_channel_figures(out, [0, 2], figures, root)
    assert [p.name for p in written] == ["channel_00000.gif", "channel_00002.png"]

    holder = subprocess.Popen([sys.executable, "-c", KEEP_CLAIM, str(figures)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(ChannelsLockedError, match="plots run A"):
            write_channel_figures(out, [0, 1], figures, root)
        assert [p.name for p in write_channel_figures(out, [1], figures, root)] == ["channel_00001.gif"]
    finally:
        holder.kill()
        holder.wait(timeout=30)

    stale = [figures / ".channel_00000.gif.tmp-999999-dead", figures / ".channel_00002.png.tmp-999999-dead"]
    for path in stale:
        path.write_bytes(b"half a figure")
    (figures / "channel_00002.gif").write_bytes(b"an old GIF of channel 2")
    write_channel_figures(out, [2], figures, root)
    assert stale[0].exists() and not stale[1].exists()  # only the claimed channel's temporaries go
    assert not (figures / "channel_00002.gif").exists() and (figures / "channel_00002.png").is_file()

    before = (figures / "channel_00000.gif").read_bytes()
    monkeypatch.setattr(atomic, "os", FaultyOs(fail_on=2))  # 1: the claim's record, 2: the figure
    with pytest.raises(OSError) as error:
        write_channel_figures(out, [0], figures, root, duration_ms=500)
    assert error.value.errno == errno.ENOSPC and "channel_00000.gif" in str(error.value)
    monkeypatch.undo()
    assert (figures / "channel_00000.gif").read_bytes() == before
    # no temporary: the failed write's own is removed, and channel 0's stale one went when it was claimed
    assert not [p.name for p in figures.iterdir() if atomic.is_temp_name(p.name)]


def test_unusable_example_images_are_placeholders_not_errors(stats, tmp_path):
    """A dataset-example image that is corrupt, has a NUL byte or a name too long for the file system, or
    escapes the image root is drawn as a placeholder (as a missing one is): the stage goes on."""
    from ddr_core.plots import _load_image

    root, out = stats
    corrupt = tmp_path / "root" / "images" / "0.png"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes((root / "images" / "0.png").read_bytes()[:40])
    for relative in ("images/0.png", "images/\x00.png", "images/" + "n" * 300 + ".png", "../../etc/passwd", None):
        assert _load_image(tmp_path / "root", relative) is None, relative
    assert _load_image(root, "images/1.png").size == (32, 32)
    for name in ("1.png", "2.png", "3.png"):
        (tmp_path / "root" / "images" / name).write_bytes(b"not a png")
    assert len(render_channel_figure(out, 0, image_root=tmp_path / "root")) == 3


def test_figures_drawn_from_the_same_stamp_are_not_drawn_again(stats, tmp_path, monkeypatch):
    """A re-run with everything present redraws nothing (issue: the demo's re-run redrew every plot); another
    stamp (new statistics, settings or code) or a missing figure redraws that channel."""
    from ddr_core import plots

    root, out = stats
    figures = tmp_path / "figures"
    drawn: list[int] = []
    render = plots.render_channel_figure
    monkeypatch.setattr(plots, "render_channel_figure",
                        lambda stats_dir, channel, *a, **k: drawn.append(channel) or render(stats_dir, channel, *a, **k))
    first = plots.write_channel_figures(out, [0, 2], figures, root, stamp="v1")
    again = plots.write_channel_figures(out, [0, 2], figures, root, stamp="v1")
    assert again == first and drawn == [0, 2]
    first[1].unlink()
    plots.write_channel_figures(out, [0, 2], figures, root, stamp="v1")
    assert drawn == [0, 2, 2]  # only the missing one
    plots.write_channel_figures(out, [0], figures, root, stamp="v2")
    plots.write_channel_figures(out, [0], figures, root)  # no stamp: always drawn
    assert drawn == [0, 2, 2, 0, 0]
