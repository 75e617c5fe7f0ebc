"""StepFlow options as harnesses pass them: ``key=value`` strings from a command line, into a StepFlowConfig."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import StepscopeError
from ..stepflow import StepFlowConfig, parse_layers
from ..stepflow.intervention import BOOL_WORDS

# The StepFlowConfig fields a harness may set (eps is internal: a numerical guard, not a setting).
FIELDS = ("oeb", "oeb_layers", "tau_max", "smi", "smi_layers", "alpha", "smi_window", "smi_at_summary",
          "band_fraction", "sink_tokens")


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in BOOL_WORDS:
        raise StepscopeError(f"StepFlow option {name}={value!r} is not true or false")
    return BOOL_WORDS[text]


def _layers(name: str, value: Any) -> tuple[int, ...] | None:
    """``0-7``, ``0:2:4``, ``0+2+4`` (harness argument strings split on commas), an int, or a list."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "default")):
        return None
    if isinstance(value, bool):
        raise StepscopeError(f"StepFlow option {name}={value!r} is not a layer list")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(int(x) for x in value)
    return parse_layers(str(value).replace(":", ",").replace("+", ",").replace(" ", ","))


def stepflow_config(options: Mapping[str, Any], *, enabled: Any = True) -> StepFlowConfig | None:
    """A StepFlowConfig from harness options (unknown names are refused); None when ``enabled`` is false."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise StepscopeError(f"unknown StepFlow option(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    if not _bool("stepflow", enabled):
        return None
    kwargs: dict[str, Any] = {}
    types = {f.name: f.type for f in dataclasses.fields(StepFlowConfig)}
    for name, value in options.items():
        if value is None:
            continue
        if name.endswith("_layers"):
            kwargs[name] = _layers(name, value)
        elif name in ("oeb", "smi", "smi_at_summary"):
            kwargs[name] = _bool(name, value)
        elif name in ("smi_window", "sink_tokens"):
            kwargs[name] = None if str(value).lower() == "none" else int(value)
        else:
            try:
                kwargs[name] = float(value)
            except (TypeError, ValueError):
                raise StepscopeError(f"StepFlow option {name}={value!r} is not a number ({types[name]})") from None
    return StepFlowConfig(**kwargs)
