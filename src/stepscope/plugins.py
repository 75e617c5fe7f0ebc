"""Loading user extensions: interventions, graders and trace formats registered from modules outside the package.

A package exposes its extensions through entry points in the groups ``stepscope.interventions``,
``stepscope.graders`` and ``stepscope.profiles`` (each entry point names a module, or an object inside one, whose
import registers them); a script or a shell lists modules to import in ``$STEPSCOPE_PLUGINS`` (comma-separated).
Each group is loaded once per process, the first time a registry is asked what it knows.
"""

from __future__ import annotations

import importlib
import os

from .errors import StepscopeError

ENV = "STEPSCOPE_PLUGINS"
GROUPS = ("interventions", "graders", "profiles")
_loaded: set[str] = set()


def load(group: str) -> None:
    """Import the entry points of ``stepscope.<group>`` and the modules of ``$STEPSCOPE_PLUGINS`` (once each)."""
    if group not in GROUPS:
        raise StepscopeError(f"unknown plug-in group {group!r}; known: {', '.join(GROUPS)}")
    if group not in _loaded:
        _loaded.add(group)
        from importlib.metadata import entry_points

        for ep in entry_points(group=f"stepscope.{group}"):
            try:
                ep.load()
            except Exception as e:  # a broken third-party plug-in must say which one it is
                raise StepscopeError(f"the {group} plug-in {ep.name!r} ({ep.value}) failed to load: {e}") from e
    if "env" not in _loaded:
        _loaded.add("env")
        for name in [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise StepscopeError(f"cannot import {name!r} listed in ${ENV}: {e}") from e


def reset() -> None:
    """Forget what was loaded (tests that change ``$STEPSCOPE_PLUGINS``)."""
    _loaded.clear()
