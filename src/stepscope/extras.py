"""Optional dependencies: import a package of an extra on first use, or say in one line how to install it.

The core install (``pip install stepscope``) is enough for generation, Step-Saliency and StepFlow. Grading needs
``[eval]``, pictures ``[report]``; ``to_pandas()`` needs pandas (``[notebook]``). Every import of such a package
goes through :func:`require`, so a missing one is a :class:`MissingExtraError` (a ``StepscopeError``, which the
command line prints as one line, and an ``ImportError`` for code that already catches those).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import StepscopeError

# import name -> (distribution name, extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "report"),
    "math_verify": ("math-verify", "eval"),
    "reasoning_gym": ("reasoning-gym", "eval"),
    "accelerate": ("accelerate", "eval"),
    "pandas": ("pandas", "notebook"),
    "lm_eval": ("lm-eval", "lm-eval"),
    "lighteval": ("lighteval", "lighteval"),
}


class MissingExtraError(StepscopeError, ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_hint(package: str) -> str:
    """``pip install 'stepscope[EXTRA]'`` for the top-level import name ``package``."""
    _, extra = PACKAGES[package.split(".")[0]]
    return f"pip install 'stepscope[{extra}]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``); if its package is missing, raise a one-line error that
    says what needs it (``purpose``) and which extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        # Only the optional package itself being absent is ours to explain; a broken install inside it is not.
        if e.name is None or e.name.split(".")[0] != top:
            raise
        dist, _ = PACKAGES[top]
        raise MissingExtraError(f"{purpose} needs {dist}, which is not installed: {install_hint(top)}",
                                name=top) from None
