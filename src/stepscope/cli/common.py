"""Options and helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
import warnings
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
    g.add_argument("--profile", default="auto", choices=profile_choices(),
                   help="trace format (default: detected from the tokenizer)")


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    # the next-token rule: stepscope.sampling.SamplingConfig's fields, checked there (sampling_from_args)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0 = off; "
                   "Qwen3 thinking: --temperature 0.6 --top-p 0.95 --top-k 20 --min-p 0)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less than this times as likely as the top one, in [0, 1] (default 0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="penalise tokens already in the prompt or response, > 0 (default 1 = off; also greedy)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a response once its text contains TEXT (repeatable; the text is kept in the trace; "
                   "for a newline use the shell's $'\\n')")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--no-instruction", action="store_true",
                   help="send the question as is (by default a plain-instruct model is asked for steps and a "
                   "'Final answer:' line)")


def sampling_from_args(args):
    """The :class:`~stepscope.sampling.SamplingConfig` of the generation flags (bad values: a StepscopeError that
    names the flag, raised before any model loads)."""
    from ..sampling import SamplingConfig

    config = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, stop=tuple(args.stop or ()))
    idle = [flag for flag, on in (("--top-p", config.top_p < 1), ("--top-k", config.top_k > 0),
                                  ("--min-p", config.min_p > 0)) if on]
    if config.greedy and idle:
        warnings.warn(f"{', '.join(idle)} change nothing at --temperature 0 (greedy decoding); set --temperature "
                      "(e.g. 0.6) to sample", stacklevel=2)
    return config


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


def profile_choices() -> list[str]:
    """``--profile`` values: auto-detection and every known trace format (plug-ins included)."""
    from ..profiles import profile_names

    return ["auto", *profile_names()]


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
