"""``python -m stepscope.integrations.lm_eval ARGS``: lm-eval's command line with the ``stepflow`` model registered.

The arguments are lm-eval's own (``run --model stepflow --model_args ... --tasks ...``); this only registers the
model first, because lm-eval 0.4.13's command line discovers no models outside its own package.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    # importing the package registered the "stepflow" model, if lm-eval is there
    from ...errors import StepscopeError
    from . import _missing

    if _missing is not None:  # the extra is missing: one line, not a traceback
        print(f"stepscope: error: {_missing}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "lm-eval"  # lm-eval's parser reads sys.argv and names itself in its help
    try:
        cli_evaluate()
    except StepscopeError as e:  # e.g. a bad StepFlow option in --model_args
        print(f"stepscope: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
