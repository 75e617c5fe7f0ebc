"""A sandbox for model-written code: the strongest isolation this machine offers, limits, a private verdict.

See :mod:`.runner` for what one run gets, :mod:`.backends` for the isolation backends and docs/evaluation.md
for the threat model.
"""

from .backends import BACKENDS, ENV_VAR
from .limits import Limits
from .runner import (
    RESULT_FD_ENV,
    STATUSES,
    TEMP_PREFIX,
    SandboxResult,
    isolation_mode,
    run_python,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "RESULT_FD_ENV",
    "STATUSES",
    "TEMP_PREFIX",
    "Limits",
    "SandboxResult",
    "isolation_mode",
    "run_python",
]
