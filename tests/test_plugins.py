"""Plug-in loading: entry points per group and $STEPSCOPE_PLUGINS, once each, with clear errors."""

from __future__ import annotations

import importlib.metadata

import pytest

from stepscope import plugins
from stepscope.errors import StepscopeError


class _EntryPoint:
    def __init__(self, name, fail=False):
        self.name, self.value, self.fail, self.loads = name, f"somewhere:{name}", fail, 0

    def load(self):
        self.loads += 1
        if self.fail:
            raise RuntimeError("boom")


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv(plugins.ENV, raising=False)
    plugins.reset()
    yield
    plugins.reset()


def test_each_group_loads_its_entry_points_once(fresh, monkeypatch):
    good = _EntryPoint("mine")
    asked = []

    def entry_points(group):
        asked.append(group)
        return [good] if group == "stepscope.graders" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    plugins.load("graders")
    plugins.load("graders")
    plugins.load("profiles")
    assert good.loads == 1 and asked == ["stepscope.graders", "stepscope.profiles"]


def test_a_broken_plugin_and_an_unknown_group_are_named(fresh, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [_EntryPoint("broken", fail=True)] if group == "stepscope.profiles" else [])
    with pytest.raises(StepscopeError, match=r"the profiles plug-in 'broken' .* failed to load: boom"):
        plugins.load("profiles")
    with pytest.raises(StepscopeError, match="unknown plug-in group 'widgets'"):
        plugins.load("widgets")
