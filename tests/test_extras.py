"""Optional packages: imported on use; a missing one is a one-line error that names the extra."""

from __future__ import annotations

import sys

import pytest

from stepscope import extras
from stepscope.errors import StepscopeError
from stepscope.extras import MissingExtraError, require


def test_require_returns_the_module():
    import numpy  # a core dependency, so always there

    assert require("numpy", "testing") is numpy


@pytest.mark.parametrize("module, extra, dist", [
    ("matplotlib.figure", "report", "matplotlib"), ("math_verify", "eval", "math-verify"),
    ("reasoning_gym.factory", "eval", "reasoning-gym"), ("pandas", "notebook", "pandas"),
])
def test_a_missing_package_names_its_extra(monkeypatch, module, extra, dist):
    if "." in module:  # a cached submodule would be found without its package
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)  # as if it were not installed
    with pytest.raises(MissingExtraError) as info:
        require(module, "doing the thing")
    message = str(info.value)
    assert message == f"doing the thing needs {dist}, which is not installed: pip install 'stepscope[{extra}]'"
    assert isinstance(info.value, StepscopeError) and isinstance(info.value, ImportError)


def test_a_broken_install_is_not_blamed_on_the_extra(tmp_path, monkeypatch):
    # the package is there but one of its own imports fails: that error must come through unchanged
    (tmp_path / "fakeextra").mkdir()
    (tmp_path / "fakeextra" / "__init__.py").write_text("import no_such_inner_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(extras.PACKAGES, "fakeextra", ("fake-extra", "fake"))
    with pytest.raises(ModuleNotFoundError) as info:
        require("fakeextra", "testing")
    assert not isinstance(info.value, MissingExtraError) and info.value.name == "no_such_inner_dependency"


def test_plotting_without_matplotlib_says_how_to_install(monkeypatch):
    from stepscope.figures import new_figure

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'stepscope\[report\]'"):
        new_figure()


def test_grading_math_without_math_verify_says_how_to_install(monkeypatch):
    from stepscope.evaluation import graders
    from stepscope.evaluation.datasets import Problem

    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'stepscope\[eval\]'"):
        graders._grade_math(Problem("toy/0", "1+1?", "2", "math", {}), "Final answer: 2", 5.0)
