"""``python -m stepscope.integrations.lighteval MODEL_ARGS TASKS [OPTIONS]``: ``lighteval custom`` with StepFlow's
model file filled in. MODEL_ARGS is lighteval's ``model_name=...,key=value`` string with StepFlow options; OPTIONS
are ``lighteval custom``'s own (``--custom-tasks``, ``--output-dir``, ``--max-samples``, ...).
``--model-file`` prints the model file's path, for calling ``lighteval custom`` directly."""

from __future__ import annotations

import sys
from pathlib import Path

MODEL_FILE = Path(__file__).with_name("custom_model.py")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--model-file"]:
        print(MODEL_FILE)
        return 0
    if len(args) < 2 or args[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    from ...errors import StepscopeError
    from . import _missing

    if _missing is not None:  # the extra is missing: one line, not a traceback
        print(f"stepscope: error: {_missing}", file=sys.stderr)
        return 2
    import click
    from lighteval.__main__ import app

    try:
        app(["custom", args[0], str(MODEL_FILE), *args[1:]], prog_name="lighteval", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return 2
    except StepscopeError as e:  # e.g. a bad StepFlow option in MODEL_ARGS
        print(f"stepscope: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
