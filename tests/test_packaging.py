"""Packaging: metadata, the lean core and its extras, the sdist's contents, and a command line that starts fast."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stepscope

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "stepscope"
OPTIONAL = {"matplotlib", "math_verify", "reasoning_gym", "accelerate", "pandas", "lm_eval", "lighteval"}
CORE = {"torch", "transformers", "safetensors", "numpy", "tqdm", "gguf", "regex"}

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the metadata checks need a TOML reader


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout


# -- metadata --------------------------------------------------------------------------------------------------
def test_build_needs_setuptools_77_for_the_license_string(project):
    (req,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert re.fullmatch(r"setuptools>=(\d+)", req) and int(req.split(">=")[1]) >= 77
    assert project["project"]["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project["project"]["classifiers"])  # PEP 639 forbids both


def test_license_file_is_the_apache_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150


def test_the_core_is_lean_and_the_rest_are_extras(project):
    meta = project["project"]
    assert names(meta["dependencies"]) == CORE
    extras = meta["optional-dependencies"]
    assert names(extras["eval"]) == {"math-verify", "reasoning-gym", "accelerate"}
    assert names(extras["report"]) == {"matplotlib"}
    assert names(extras["lm-eval"]) == {"lm-eval"} and names(extras["lighteval"]) == {"lighteval"}
    assert {"pytest", "hypothesis", "scipy", "ruff", "mypy"} <= names(extras["dev"])
    # [test] alone still gives a working test environment
    assert {"pytest", "hypothesis", "scipy"} <= names(extras["test"]) and "stepscope[eval,report]" in extras["test"]


def test_classifiers_and_urls_without_placeholders(project):
    meta = project["project"]
    assert "Programming Language :: Python :: 3" in meta["classifiers"] and "Typing :: Typed" in meta["classifiers"]
    assert meta["urls"] and all(url.startswith("https://") for url in meta["urls"].values())
    for value in json.dumps(meta).lower().split('"'):
        assert "example.com" not in value and "todo" not in value and "your-" not in value


def test_package_data_names_only_files_that_exist(project):
    patterns = project["tool"]["setuptools"]["package-data"]["stepscope"]
    for pattern in patterns:
        assert list(SRC.glob(pattern)), f"package-data {pattern!r} matches nothing"


def test_makefile_installs_pinned_torch_first_then_the_test_extras():
    lines = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line]
    torch_at = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    package_at = next(i for i, line in enumerate(lines) if "-e '.[" in line)
    assert torch_at < package_at
    installed = set(re.search(r"-e '\.\[([^\]]+)\]'", lines[package_at]).group(1).split(","))
    assert {"dev", "eval", "report"} <= installed


def test_the_sdist_carries_what_the_readme_links_to():
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert re.search(r"^graft docs$", manifest, re.MULTILINE)
    for name in ("LICENSE", "CHANGELOG.md", "README.md"):
        assert re.search(rf"^include .*\b{re.escape(name)}\b", manifest, re.MULTILINE) and (ROOT / name).is_file()
    links = re.findall(r"\]\(((?:docs/)[^)#]+)", (ROOT / "README.md").read_text())
    assert links and all((ROOT / link).is_file() for link in links)


def test_changelog_has_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text and "### Added" in text


# -- lazy imports ----------------------------------------------------------------------------------------------
def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:  # only statements run at import time of the module, not inside functions
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_module_imports_an_optional_package_at_import_time():
    offenders = {str(p.relative_to(ROOT)): sorted(_module_level_imports(p) & OPTIONAL)
                 for p in SRC.rglob("*.py") if "integrations" not in p.parts}  # plugins need their harness
    assert {k: v for k, v in offenders.items() if v} == {}


def test_import_and_every_help_leave_torch_out():
    code = """
import contextlib, io, json, sys
import stepscope
after_import = sorted(m for m in ("torch", "transformers") if m in sys.modules)
from stepscope.cli.main import build_parser
parser = build_parser()
commands = sorted(parser._subparsers._group_actions[0].choices)
for argv in [["--help"]] + [[c, "--help"] for c in commands]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        build_parser().parse_args(argv)
print(json.dumps({"import": after_import, "commands": commands,
                  "help": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""
    out = json.loads(run_python(code))
    assert out["import"] == [] and out["help"] == []
    assert {"generate", "diagnose", "eval", "report", "analyze"} <= set(out["commands"])


def test_every_public_name_resolves():
    for name in stepscope.__all__:
        assert getattr(stepscope, name) is not None
    assert stepscope.enabled.__module__ == "stepscope.stepflow.handle"
    assert stepscope.trace.Trace is stepscope.Trace  # submodules stay reachable as attributes
    assert set(stepscope.__all__) <= set(dir(stepscope))
    with pytest.raises(AttributeError):
        stepscope.no_such_name  # noqa: B018


def test_the_core_works_without_any_extra():
    # As in a fresh `pip install stepscope`: every optional package is absent (find_spec and import fail).
    code = f"""
import sys
for name in {sorted(OPTIONAL)!r}:
    sys.modules[name] = None
import stepscope
from stepscope.cli.main import main
cfg = stepscope.StepFlowConfig()
assert callable(stepscope.enabled) and callable(stepscope.generate) and callable(stepscope.step_saliency)
import numpy as np
from stepscope.saliency.result import causal_counts
steps = [stepscope.Step("question", 1, 3, "q", 0), stepscope.Step("thinking", 3, 6, "t.", 1)]
result = stepscope.StepSaliency(np.ones((2, 2, 2)), causal_counts(steps), np.zeros((2, 2)), steps)
try:
    stepscope.plot_step_map(result)
except stepscope.StepscopeError as e:
    print("plot:", e)
try:
    main(["--help"])
except SystemExit as e:
    print("help exit", e.code)
"""
    out = run_python(code)
    assert "help exit 0" in out
    assert "plot: drawing figures needs matplotlib, which is not installed: pip install 'stepscope[report]'" in out
