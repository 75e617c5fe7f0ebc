"""Shared helpers for the benchmark scripts: subprocess isolation for peak-memory measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_isolated(module: str, func: str, *args, timeout: float = 3600) -> dict:
    """Run ``module.func(*args)`` in a fresh interpreter; return its JSON result plus peak RSS (GB)."""
    code = (
        "import json, resource, sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        f"import {module} as m\n"
        "t0 = time.perf_counter()\n"
        f"out = m.{func}(*json.loads(sys.argv[1]))\n"
        "out['wall_s'] = time.perf_counter() - t0\n"
        "out['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            res = json.loads(line[6:])
            res["process_s"] = time.perf_counter() - t0
            return res
    raise RuntimeError(f"{module}.{func} failed:\n{proc.stderr[-3000:]}")
