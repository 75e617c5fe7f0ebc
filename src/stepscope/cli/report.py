"""``stepscope report``: re-summarise a results file or a run directory (shard files merged)."""

from __future__ import annotations

from pathlib import Path

from .common import add_format_arg


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="summarise evaluation results (pass@k, paired CIs, p-values)",
        description="Summarise a results .jsonl or an eval run directory (results.jsonl and every shard file, "
        "each sample counted once): pass@1 with a bootstrap interval and pass@k per condition, and each "
        "condition against the baseline with a paired bootstrap interval, an exact test and fixed/broken counts. "
        "Writes JSON, a Markdown table and a plot, and prints the table.")
    p.add_argument("path", type=Path, nargs="+",
                   help="a run directory (from stepscope eval --out or stepscope import --out) or a results .jsonl; "
                   "several are summarised together (e.g. an imported baseline and a StepFlow eval run)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the summary (default: the run directory, or beside the file)")
    p.add_argument("--baseline", default="baseline", help="the condition the others are compared with")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - interval level (default 0.05: 95%% intervals)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    add_format_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.summary import report
    from ..progress import phase

    source = args.path[0] if len(args.path) == 1 else args.path
    with phase(f"summarising ({args.n_boot} bootstrap resamples" + (")" if args.no_plot else ", a figure)")):
        summary, paths = report(source, out=args.out, plot=not args.no_plot, baseline=args.baseline,
                                n_boot=args.n_boot, alpha=args.alpha, seed=args.boot_seed, formats=args.format)
    print(summary.to_markdown())
    if summary.incomplete:
        print(f"note: {len(summary.incomplete)} problems miss samples in some condition and are left out")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
