"""Entry point: one sub-command per module, user mistakes printed as one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from ..errors import StepscopeError

# modules; diagnose adds saliency
COMMANDS = ["generate", "diagnose", "eval", "report", "analyze", "import_cmd", "calibrate", "organism"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="stepscope",
        description="Where does a reasoning model's step-to-step information flow break, and can StepFlow "
        "repair it at test time?",
    )
    parser.add_argument("--version", action="version", version=f"stepscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{name}":
                continue  # a command not built yet
            raise
        module.register(sub)
    return parser


def _one_line_warnings(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if not args.verbose:
        warnings.formatwarning = _one_line_warnings
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        _quiet_libraries()
    else:
        logging.basicConfig(level=logging.INFO)
    _line_buffered()
    from ..warnings_once import once_per_run

    try:
        with once_per_run():  # each warning once, repeats counted and reported at the end
            return int(args.func(args) or 0)
    except StepscopeError as e:
        if args.verbose:
            raise
        print(f"stepscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stepscope: interrupted", file=sys.stderr)
        return 130


def _line_buffered() -> None:
    """Flush stdout at every line even when it is piped, so that a log of a long run fills as it goes (Python
    block-buffers a piped stdout; stderr is line-buffered already)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # io.TextIOWrapper's; typed streams lack it
        if reconfigure is None:  # a replaced stream (a test's capture, a notebook)
            continue
        try:
            reconfigure(line_buffering=True)
        except (ValueError, OSError):
            pass


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
