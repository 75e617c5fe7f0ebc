"""``stepscope import``: responses generated elsewhere -> traces and a results directory the other commands read."""

from __future__ import annotations

from pathlib import Path

from .common import profile_choices

FORMAT_CHOICES = ("auto", "openai", "lm-eval", "lighteval", "plain")


def register(sub) -> None:
    p = sub.add_parser(
        "import", help="bring in responses generated elsewhere (vLLM / OpenAI-style, lm-eval, lighteval, JSONL)",
        description="Turn responses generated elsewhere into stepscope traces (tokenised once with the model's "
        "tokenizer; exact token spans) and a results directory laid out like an eval run: OUT/results.jsonl, "
        "OUT/traces/<condition>/ and OUT/import.json. `stepscope report OUT`, `stepscope diagnose --trace "
        "OUT/traces/...` and `stepscope analyze --traces OUT` read it. Formats: OpenAI-style / vLLM JSONL "
        "(prompt or messages + choices / outputs), lm-eval --log_samples files, lighteval details (parquet or "
        "JSON), or a plain JSONL of prompt + response.")
    p.add_argument("files", nargs="+", type=Path, help="files to import (each one's format is detected)")
    p.add_argument("--out", type=Path, required=True, help="the results directory to write")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="the files' format (default: detect)")
    g = p.add_argument_group("tokenisation")
    g.add_argument("--model", default="default",
                   help="the model whose tokenizer the traces use: the one that generated the responses, and "
                   "the one diagnose / analyze will run ('default', 'organism', a directory or a hub id)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    g.add_argument("--profile", default="auto", choices=profile_choices(),
                   help="trace format (default: detected from the tokenizer)")
    g.add_argument("--prompt-mode", default="auto", choices=["auto", "chat", "raw"],
                   help="how a prompt becomes tokens: raw (as is: the exact model input, e.g. an lm-eval or "
                   "completions prompt) or chat (put into the chat template as the user turn); auto: chat for "
                   "messages and question fields, raw for prompt fields and harness files")
    g.add_argument("--system", default=None, help="a system prompt for templated prompts")
    g.add_argument("--retokenize", action="store_true",
                   help="tokenise the response text even where the file has token ids")
    f = p.add_argument_group("fields of a plain or OpenAI-style JSONL")
    f.add_argument("--prompt-field", default=None, help="the prompt field (default: prompt, question, problem, ...)")
    f.add_argument("--response-field", default=None, help="the response field (default: response, completion, ...)")
    f.add_argument("--gold-field", default=None, help="the gold answer field (default: gold, answer, target, ...)")
    f.add_argument("--id-field", default=None, help="the problem id field (default: problem_id, id, ...; in "
                   "OpenAI-style files only problem_id: an API's id names a response, not a problem)")
    r = p.add_argument_group("problems and grading")
    r.add_argument("--dataset", default=None,
                   help="match each response to a problem of this set (gsm8k, math500, ...) by id or question: "
                   "ids, golds and graders come from it, so the samples pair with stepscope eval runs")
    r.add_argument("--data-dir", type=Path, default=None, help="offline copies of the sets (or STEPSCOPE_DATA_DIR)")
    r.add_argument("--grade", action="store_true", help="grade the responses (gold from --dataset or the file)")
    r.add_argument("--grader", default="math", choices=["math", "choice", "exact"],
                   help="how to grade against a gold from the file (default: math)")
    r.add_argument("--source-metric", default=None,
                   help="take correctness from a 0/1 metric the harness recorded per sample (e.g. exact_match)")
    r.add_argument("--workers", type=int, default=2, help="grading processes")
    p.add_argument("--condition", default="baseline", help="the condition name the samples get (default: baseline)")
    p.add_argument("--overwrite", action="store_true", help="replace results imported into --out before")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.importing import import_samples, samples_from_files
    from ..models import load_tokenizer

    samples, sources = samples_from_files(
        args.files, args.format, prompt_field=args.prompt_field, response_field=args.response_field,
        gold_field=args.gold_field, id_field=args.id_field)
    for src in sources:
        print(f"read {src['samples']} samples from {src['file']} ({src['format']})")
    problems = None
    if args.dataset:
        from ..evaluation.datasets import load_problems

        problems = load_problems(args.dataset, data_dir=args.data_dir)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    outcome = import_samples(
        samples, tok, args.out, model_name=args.model, profile=args.profile, prompt_mode=args.prompt_mode,
        system=args.system, condition=args.condition, problems=problems, dataset=args.dataset, grade=args.grade,
        grader=args.grader, source_metric=args.source_metric, retokenize=args.retokenize,
        overwrite=args.overwrite, workers=args.workers, sources=sources)
    print(f"wrote {outcome.samples} traces of {outcome.problems} problems to {outcome.out} "
          f"(condition {args.condition})")
    for kind, count in sorted(outcome.warnings.items()):
        print(f"note: {count} of {outcome.samples} traces: {kind}")
    if outcome.graded and outcome.accuracy is not None:
        print(f"accuracy {100 * outcome.accuracy:.1f}% over {outcome.samples} samples; next: stepscope report "
              f"{outcome.out}")
    else:
        print("not graded (pass --grade, or --source-metric NAME): report and analyze need graded samples")
    if outcome.first_trace is not None:
        print(f"diagnose one: stepscope diagnose --model {args.model} --trace {outcome.first_trace}")
    return 0
