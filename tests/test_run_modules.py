"""The eval run split by concern: each name lives in one module and the runner re-exports it unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stepscope.evaluation import conditions, run_config, runner, shards, store

HOMES = {
    conditions: ["CONDITION_NAMES", "Condition", "build_conditions", "parse_conditions"],
    run_config: ["RunConfig", "Sampling", "problems_fingerprint", "sample_seed"],
    shards: ["RESULTS_NAME", "Shard", "parse_shard"],
    store: ["RUN_NAME", "TRACES_DIR", "ResultsLock", "lock_results", "merge_results", "prepare_run_dir",
            "read_results", "read_run_file", "record_key", "result_files", "trace_names", "update_run_info"],
}


@pytest.mark.parametrize("module", list(HOMES), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_the_runner_re_exports_each_name_from_its_home(module):
    for name in HOMES[module]:
        assert getattr(runner, name) is getattr(module, name), name


def test_every_public_runner_name_still_resolves():
    missing = [name for name in runner.__all__ if not hasattr(runner, name)]
    assert not missing


def test_the_whole_run_is_the_default_shard():
    assert shards.WHOLE_RUN == shards.Shard() == shards.parse_shard("0/1")
    assert shards.WHOLE_RUN.results_name == shards.RESULTS_NAME
    assert shards.SHARD_FILE.fullmatch(shards.Shard(2, 4).results_name)
    assert not shards.SHARD_FILE.fullmatch(shards.RESULTS_NAME)


def test_reading_a_run_does_not_import_the_loop():
    """The store and config read a run directory (summaries, notebooks) without the generation loop."""
    code = ("import sys; import stepscope.evaluation.store, stepscope.evaluation.run_config; "
            "print('stepscope.evaluation.runner' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
