"""Options and helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import StepscopeError

EXAMPLE_QUESTION = (
    "A bakery sells muffins for 3 dollars each. On Monday it sells 14 muffins, and on Tuesday it sells twice "
    "as many as on Monday. How much money does the bakery make from muffins on the two days together?"
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), 'organism', a local directory or a hub id")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: float32 on CPU)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: auto)")
    g.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. auto) for multi-GPU models")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    g.add_argument("--profile", default="auto", choices=["auto", "think", "harmony", "plain"],
                   help="trace format (default: detected from the tokenizer)")


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--no-instruction", action="store_true",
                   help="send the question as is (by default a plain-instruct model is asked for steps and a "
                   "'Final answer:' line)")


def add_question_args(p: argparse.ArgumentParser, example: bool = True) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--question", action="append", help="a question (repeatable)")
    g.add_argument("--input", type=Path, help="JSONL file with one question per line")
    g.add_argument("--question-field", default="question", help="field of --input lines holding the question")
    if example:
        g.add_argument("--example", action="store_true", help="use a built-in example question")


def add_out_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", type=Path, default=Path(default), help=f"output directory (default: {default})")


def figure_formats(text: str) -> tuple[str, ...]:
    """argparse type of --format: ``png,pdf,svg`` -> ("png", "pdf", "svg"); unknown names are a usage error."""
    from ..figures import parse_formats

    try:
        return parse_formats(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", type=figure_formats, default=("png",), metavar="FMT[,FMT]",
                   help="figure files to write: any of png (200 dpi), pdf, svg, comma-separated (default: png)")


def load_model_from_args(args):
    from ..models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code)


def questions_from_args(args) -> list[str]:
    qs: list[str] = list(args.question or [])
    if getattr(args, "example", False):
        qs.append(EXAMPLE_QUESTION)
    if args.input is not None:
        qs.extend(read_questions(args.input, args.question_field))
    if not qs:
        raise StepscopeError("no question given: use --question '...', --input FILE.jsonl or --example")
    for q in qs:
        if not q.strip():
            raise StepscopeError("the question is empty; pass the text of a problem")
    return qs


def read_questions(path: Path, field: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise StepscopeError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise StepscopeError(f"{path} is not UTF-8 text; pass a JSONL file with one question per line") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise StepscopeError(f"{path}:{n} is not a JSON object (one per line expected)") from None
        if isinstance(row, str):
            out.append(row)
        elif isinstance(row, dict) and isinstance(row.get(field), str):
            out.append(row[field])
        else:
            raise StepscopeError(f"{path}:{n} has no string field {field!r} (choose one with --question-field)")
    return out


def with_instruction(questions: list[str], tokenizer, profile: str, skip: bool) -> list[str]:
    """Append the profile's instruction (plain-instruct models are asked for steps and an answer line)."""
    from ..profiles import get_profile

    prof = get_profile(profile, tokenizer)
    if skip or not prof.instruction:
        return questions
    return [f"{q}\n\n{prof.instruction}" for q in questions]
