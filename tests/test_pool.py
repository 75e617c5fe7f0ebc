"""The isolated worker pool: a crash, a hang or an exception fails one item, never the batch."""

import time

from stepscope.sandbox.pool import map_isolated


def test_isolated_map_survives_a_crash_a_hang_and_an_exception():
    items = ["1 + 1", "__import__('os')._exit(3)", "__import__('time').sleep(60)", "2 + 2", "1 / 0", "3 * 3"]
    start = time.monotonic()
    results = map_isolated(eval, items, workers=2, deadline_s=2)
    assert time.monotonic() - start < 20
    assert results[0] == (True, 2) and results[3] == (True, 4) and results[5] == (True, 9)
    assert results[1][0] is False and "died" in results[1][1]
    assert results[2][0] is False and "longer than 2 s" in results[2][1]
    assert results[4] == (False, "ZeroDivisionError: division by zero")
