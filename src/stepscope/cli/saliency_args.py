"""Step-Saliency command-line flags, shared by diagnose / saliency, analyze and calibrate. Their defaults are the
library's (:mod:`stepscope.defaults`)."""

from __future__ import annotations

import argparse

from ..defaults import BAND_FRACTION, CHUNK_MB, KEEP_MB, SALIENCY_TARGET, SALIENCY_TARGETS

ArgGroup = argparse.ArgumentParser | argparse._ArgumentGroup


def add_band_fraction_arg(g: ArgGroup) -> None:
    g.add_argument("--band-fraction", type=float, default=BAND_FRACTION,
                   help=f"shallow/deep band size as a share of layers (default {BAND_FRACTION:g}: a quarter)")


def add_saliency_args(g: ArgGroup, *, keep_mb: bool = True) -> None:
    """``--target``, ``--chunk-mb``, ``--keep-mb`` (unless ``keep_mb=False``) and ``--band-fraction``."""
    g.add_argument("--target", default=SALIENCY_TARGET, choices=list(SALIENCY_TARGETS),
                   help="next-token losses that make up L (default: every target token)")
    g.add_argument("--chunk-mb", type=float, default=CHUNK_MB,
                   help=f"memory budget of one chunk of query rows (MB; default {CHUNK_MB:g})")
    if keep_mb:
        g.add_argument("--keep-mb", type=float, default=KEEP_MB,
                       help="memory for keeping top layers' graphs instead of recomputing them (MB; default "
                       f"{KEEP_MB:g}; 0: leanest)")
    add_band_fraction_arg(g)
