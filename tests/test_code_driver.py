"""The judge's value codec: exact round trips of plain data, and nothing else gets through."""

from __future__ import annotations

import math
import random

import pytest

from stepscope.evaluation import code_driver as driver


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none", "bytes", "complex"]
    if depth < 3:
        kinds += ["list", "tuple", "dict", "set", "frozenset"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-10**30, 10**30)
    if kind == "float":
        return rng.choice([rng.uniform(-1e6, 1e6), math.inf, -math.inf, 0.0, -0.0, 1e-300])
    if kind == "str":
        return "".join(rng.choice("ab\u00e9\n\"{}$") for _ in range(rng.randint(0, 6)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 5)))
    if kind == "complex":
        return complex(rng.uniform(-5, 5), rng.uniform(-5, 5))
    items = [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    hashable = [v for v in items if isinstance(v, (int, float, str, bool, bytes, type(None), tuple, frozenset, complex))
                and _hashable(v)]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    if kind == "dict":
        return dict(zip(hashable, items))
    if kind == "set":
        return set(hashable)
    return frozenset(hashable)


def _hashable(v) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


def _same(a, b) -> bool:
    """Equal and of exactly the same types all the way down (== alone would let 1 == 1.0 == True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@pytest.mark.parametrize("seed", range(200))
def test_plain_values_round_trip_exactly(seed):
    import json

    value = _random_value(random.Random(seed))
    wire = json.loads(json.dumps(driver.encode(value), allow_nan=True))
    assert _same(driver.decode(wire), value)


def test_nan_survives():
    import json

    out = driver.decode(json.loads(json.dumps(driver.encode([math.nan]))))
    assert math.isnan(out[0])


@pytest.mark.parametrize("value", [
    type("AlwaysEqual", (), {"__eq__": lambda self, other: True})(),
    type("IntLike", (int,), {"__eq__": lambda self, other: True})(3),
    type("StrLike", (str,), {})("x"),
    (x for x in range(3)),
    {1, 2}.__iter__(),
    [object()],
])
def test_anything_but_plain_data_is_refused(value):
    with pytest.raises(TypeError):
        driver.encode(value)


@pytest.mark.parametrize("wire", [{"$eval": "1"}, {"$tuple": [1], "$set": [2]}, {"a": 1}, {"$dict": [[[1], 2]]}])
def test_malformed_wire_values_are_refused(wire):
    with pytest.raises((ValueError, TypeError)):
        driver.decode(wire)


def test_nesting_is_bounded():
    deep: list = []
    for _ in range(driver.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(TypeError):
        driver.encode(deep)
