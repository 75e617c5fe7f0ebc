"""Figure output: the format follows the file name, PNGs at 200 dpi, reproducible bytes, no pyplot state."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stepscope import figures

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF", "svg": b"<?xml"}


def small_figure():
    fig = figures.new_figure(figsize=(3.0, 2.0))
    fig.add_subplot().plot([0, 1, 2], [1, 0, 1])
    return fig


@pytest.mark.parametrize("fmt", figures.FORMATS)
def test_save_figure_writes_the_format_of_the_extension(tmp_path, fmt):
    path = figures.save_figure(small_figure(), tmp_path / "sub" / f"plot.{fmt.upper()}")
    data = path.read_bytes()
    assert data.startswith(MAGIC[fmt])
    if fmt == "svg":
        assert b"<svg" in data[:2000]


def test_png_is_200_dpi_at_the_figure_size(tmp_path):
    from matplotlib.image import imread

    path = figures.save_figure(small_figure(), tmp_path / "plot.png")
    assert imread(path).shape[:2] == (2 * figures.PNG_DPI, 3 * figures.PNG_DPI)
    assert figures.PNG_DPI >= 200


def test_unknown_extension_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\.png, \.pdf or \.svg"):
        figures.save_figure(small_figure(), tmp_path / "plot.jpg")
    with pytest.raises(ValueError):
        figures.save_figure(small_figure(), tmp_path / "plot")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", figures.FORMATS)
def test_the_same_figure_gives_the_same_bytes(fmt):
    # no dates and no random SVG ids: rerunning a command does not rewrite its figures
    assert figures.figure_bytes(small_figure(), fmt) == figures.figure_bytes(small_figure(), fmt)


def test_save_formats_writes_each_and_reuses_given_png(tmp_path):
    paths = figures.save_formats(small_figure(), tmp_path / "fig", ("png", "svg"), png=b"rendered")
    assert [p.name for p in paths] == ["fig.png", "fig.svg"]
    assert paths[0].read_bytes() == b"rendered" and paths[1].read_bytes().startswith(MAGIC["svg"])


@pytest.mark.parametrize("text, expected", [
    ("png", ("png",)), ("png,pdf,svg", ("png", "pdf", "svg")), (" PDF, .svg ,pdf", ("pdf", "svg")),
    (["svg", "png"], ("svg", "png")),
])
def test_parse_formats(text, expected):
    assert figures.parse_formats(text) == expected


@pytest.mark.parametrize("text", ["jpg", "png,gif", "", " , "])
def test_parse_formats_refuses_unknown_or_none(text):
    with pytest.raises(ValueError):
        figures.parse_formats(text)


def test_drawing_leaves_the_backend_and_pyplot_alone(tmp_path):
    # A notebook's backend must survive: draw and save under a non-Agg backend and check it is still in use.
    code = (
        "import matplotlib; matplotlib.use('svg')\n"
        "import matplotlib.pyplot as plt\n"
        "from stepscope import figures\n"
        "fig = figures.new_figure(figsize=(2, 2)); fig.add_subplot().plot([1, 2])\n"
        f"figures.save_figure(fig, {str(tmp_path / 'a.png')!r})\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "0"]


@pytest.mark.parametrize("argv", [
    ["diagnose", "--example"], ["eval", "--dataset", "gsm8k"], ["report", "runs/x"], ["analyze"],
])
def test_commands_that_write_figures_take_format(argv):
    from stepscope.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(argv).format == ("png",)
    assert parser.parse_args([*argv, "--format", "png,pdf,svg"]).format == ("png", "pdf", "svg")
    with pytest.raises(SystemExit) as info:
        parser.parse_args([*argv, "--format", "jpg"])
    assert info.value.code == 2  # a usage error, not a traceback
