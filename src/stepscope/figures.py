"""Figure output shared by every picture stepscope draws: an Agg figure, and files chosen by their extension.

Figures are ``matplotlib.figure.Figure`` objects on their own Agg canvas, never made through ``pyplot``: no global
figure registry, no backend switch, so drawing is safe in scripts, servers and notebooks (a notebook's inline
backend stays as it was). PNGs are written at :data:`PNG_DPI`; PDF and SVG are vector files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .extras import require

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure

FORMATS = ("png", "pdf", "svg")
PNG_DPI = 200  # print quality; also sharp on high-density screens
MIN_FONT_PT = 8.0  # smallest text in any figure at its natural size (paper-readable)


def new_figure(**kwargs) -> Figure:
    """A constrained-layout ``Figure`` with an Agg canvas attached (no pyplot)."""
    figure = require("matplotlib.figure", "drawing figures")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    kwargs.setdefault("layout", "constrained")
    fig = figure.Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def format_of(path: str | os.PathLike) -> str:
    """The output format named by ``path``'s extension; a ValueError for anything but png, pdf or svg."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"cannot tell the figure format of {str(path)!r}: end the name in .png, .pdf or .svg")
    return fmt


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = PNG_DPI) -> Path:
    """Write ``fig`` in the format of ``path``'s extension (parent folders created); ``dpi`` applies to PNG."""
    path = Path(path)
    fmt = format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _savefig(fig, path, fmt, dpi)
    return path


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = PNG_DPI) -> bytes:
    """``fig`` encoded as ``fmt`` (for embedding or writing elsewhere)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; choose from {', '.join(FORMATS)}")
    buf = io.BytesIO()
    _savefig(fig, buf, fmt, dpi)
    return buf.getvalue()


def save_formats(fig: Figure, stem: str | os.PathLike, formats: Iterable[str], dpi: int = PNG_DPI,
                 png: bytes | None = None) -> list[Path]:
    """Write ``stem.<fmt>`` for each format; ``png``: bytes already rendered at ``dpi``, written as they are."""
    out = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        if fmt == "png" and png is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        else:
            save_figure(fig, path, dpi)
        out.append(path)
    return out


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"png,pdf"`` (or a list) -> ``("png", "pdf")``: known formats only, each once, in the order given."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        fmt = item.strip().lower().lstrip(".")
        if not fmt:
            continue
        if fmt not in FORMATS:
            raise ValueError(f"unknown figure format {fmt!r}; choose from {', '.join(FORMATS)}")
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise ValueError(f"no figure format given; choose from {', '.join(FORMATS)}")
    return tuple(out)


def _savefig(fig: Figure, target, fmt: str, dpi: int) -> None:
    # The same figure gives the same bytes in every format, so reruns do not churn files: no creation date in
    # PDF / SVG, and a fixed salt for the SVG element ids (random by default).
    import matplotlib

    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt, {})
    with matplotlib.rc_context({"svg.hashsalt": "stepscope"}):
        fig.savefig(target, format=fmt, dpi=dpi, facecolor="white", metadata=metadata)
