"""Summaries of evaluation results: pass@1 / pass@k per condition and paired comparisons against the baseline.

Computation (:func:`summarize` -> :class:`Summary`) is apart from presentation (``to_dict``, ``to_markdown``,
``save_plot``). All statistics come from :mod:`stepscope.evaluation.stats`. Only problems that have every sample
in every condition are counted, so each comparison is paired problem by problem.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json_atomic, write_text_atomic
from ..errors import StepscopeError
from .run_config import RunConfig
from .stats import (
    ConfidenceInterval,
    TestResult,
    bootstrap_ci,
    mcnemar_exact,
    mean_pass_at_k,
    paired_bootstrap_ci,
    paired_power_explanation,
    sign_test,
)
from .store import merge_results, read_run_file, result_files

__all__ = ["Comparison", "ConditionSummary", "Summary", "load_summary", "pass_at_k_values", "report",
           "settings_from_records", "settings_from_run", "summarize"]

POWER_DELTA = 0.05  # the paired change the sample-size sentence is about: 5 accuracy points


@dataclass(frozen=True)
class ConditionSummary:
    """Accuracy of one condition over the complete problems."""

    name: str
    problems: int
    samples: int
    pass1: ConfidenceInterval  # mean over samples, bootstrap interval over problems
    pass_at_k: dict[int, float]  # unbiased estimator, k = 1, 2, 4, ... and n
    mean_new_tokens: float
    truncated_share: float  # samples that stopped at the token limit
    stepflow: dict | None

    def to_dict(self) -> dict:
        return {"name": self.name, "problems": self.problems, "samples": self.samples,
                "pass@1": _ci_dict(self.pass1), "pass@k": {str(k): v for k, v in self.pass_at_k.items()},
                "mean_new_tokens": self.mean_new_tokens, "truncated_share": self.truncated_share,
                "stepflow": self.stepflow}


@dataclass(frozen=True)
class Comparison:
    """A condition against the baseline on the same problems and seeds.

    ``difference``: mean per-problem accuracy change (condition - baseline) with a paired bootstrap interval.
    ``test``: exact McNemar when n == 1, else the exact sign test on per-problem differences. ``fixed`` /
    ``broken``: problems the baseline got wrong and the condition right / the reverse (by majority of
    samples when n > 1: right means more than half of the samples right). ``discordance``: the share of
    problems whose outcome (majority outcome when n > 1) differs between the two, (fixed + broken) / problems.
    """

    condition: str
    baseline: str
    problems: int
    difference: ConfidenceInterval
    test: TestResult
    fixed: int
    broken: int
    discordance: float
    power_note: str

    @property
    def verdict(self) -> str:
        if not self.difference.excludes_zero:
            return "within noise"
        return "better than baseline" if self.difference.estimate > 0 else "worse than baseline"

    def to_dict(self) -> dict:
        return {"condition": self.condition, "baseline": self.baseline, "problems": self.problems,
                "difference": _ci_dict(self.difference),
                "test": {"method": self.test.method, "p_value": self.test.p_value, "statistic": self.test.statistic,
                         "informative": self.test.n},
                "fixed": self.fixed, "broken": self.broken, "discordance": self.discordance,
                "verdict": self.verdict, "power_note": self.power_note}


@dataclass(frozen=True)
class Summary:
    """The whole result: settings, per-condition accuracy, comparisons and what was left out."""

    settings: dict
    n: int
    conditions: list[ConditionSummary]
    comparisons: list[Comparison]
    problems_seen: int
    incomplete: list[str] = field(default_factory=list)
    duplicates: int = 0
    n_boot: int = 10000
    boot_seed: int = 0
    baseline: str = "baseline"

    @property
    def problems(self) -> int:
        return self.conditions[0].problems if self.conditions else 0

    def to_dict(self) -> dict:
        return {"format": "stepscope.eval-summary", "settings": self.settings, "n": self.n,
                "problems": {"complete": self.problems, "seen": self.problems_seen,
                             "incomplete": self.incomplete},
                "duplicates_dropped": self.duplicates, "bootstrap": {"n_boot": self.n_boot, "seed": self.boot_seed},
                "conditions": {c.name: c.to_dict() for c in self.conditions},
                "comparisons": {c.condition: c.to_dict() for c in self.comparisons}}

    def to_markdown(self) -> str:
        return "\n".join(_settings_table(self) + [""] + _accuracy_table(self) + _comparison_table(self)) + "\n"

    def to_pandas(self):
        """One row per condition: pass@1 with its interval, pass@k, and the paired comparison with the baseline
        (empty for the baseline itself). Needs pandas."""
        from ..notebook import summary_frame  # pandas only when asked

        return summary_frame(self)

    def _repr_markdown_(self) -> str:  # notebooks render the same tables as summary.md
        return self.to_markdown()

    def plot(self):
        """Bar chart of pass@1 per condition with its bootstrap interval as error bars, as a matplotlib Figure
        (drawn on its own Agg canvas: no pyplot state, a notebook's backend is left alone)."""
        from ..figures import new_figure  # matplotlib only when plotting

        names = [c.name for c in self.conditions]
        est = np.array([100 * c.pass1.estimate for c in self.conditions])
        err = np.array([[100 * (c.pass1.estimate - c.pass1.low) for c in self.conditions],
                        [100 * (c.pass1.high - c.pass1.estimate) for c in self.conditions]])
        fig = new_figure(figsize=(1.6 + 1.3 * len(names), 3.6))
        ax = fig.add_subplot()
        ax.bar(names, est, yerr=err, capsize=6, color=["#8c8c8c" if n == self.baseline else "#3b75af" for n in names])
        for x, value in enumerate(est):
            ax.text(x, value / 2, f"{value:.1f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_ylabel("pass@1 (%)")
        ax.tick_params(labelsize=9)
        ax.set_ylim(0, max(100.0, float((est + err[1]).max()) if len(est) else 100.0))
        level = self.conditions[0].pass1.level if self.conditions else 0.95
        ax.set_title(f"{self.settings.get('model', '?')} on {self.settings.get('dataset', '?')}\n"
                     f"n={self.n}, {self.problems} problems, {level:.0%} bootstrap CI", fontsize=9)
        return fig

    def save_plot(self, path: str | os.PathLike) -> Path:
        """Write :meth:`plot` to ``path``: PNG (200 dpi), PDF or SVG by the extension."""
        from ..figures import save_figure

        return save_figure(self.plot(), path)

    def write(self, directory: str | os.PathLike, stem: str = "summary", plot: bool = True,
              formats: Sequence[str] = ("png",)) -> list[Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and (``plot``) ``<stem>.<fmt>`` for each of ``formats`` (png, pdf,
        svg) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"{stem}.json", directory / f"{stem}.md"]
        # atomically: shard processes finishing together never mix their writes
        write_json_atomic(paths[0], self.to_dict())
        write_text_atomic(paths[1], self.to_markdown())
        if plot and self.conditions:
            from ..extras import MissingExtraError
            from ..figures import parse_formats, save_figure

            formats = parse_formats(formats)
            try:
                fig = self.plot()
            except MissingExtraError as e:  # after a long run the numbers matter more than the picture
                warnings.warn(f"{e}; the summary figure was skipped", stacklevel=2)
                return paths
            for fmt in formats:
                final = directory / f"{stem}.{fmt}"
                # through a temporary file, as for the JSON: concurrent shards never leave a half-written figure
                os.replace(save_figure(fig, directory / f".{stem}.{os.getpid()}.tmp.{fmt}"), final)
                paths.append(final)
        return paths


def _ci_dict(ci: ConfidenceInterval) -> dict:
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "level": ci.level, "n": ci.n}


# --- computation ----------------------------------------------------------------------------------------------


def pass_at_k_values(n: int) -> list[int]:
    """k = 1, 2, 4, 8, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks + ([n] if ks[-1] != n else [])


def _outcomes(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[int, bool]]]:
    """condition -> problem id -> sample -> correct."""
    table: dict[str, dict[str, dict[int, bool]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        table[str(r["condition"])][str(r["problem_id"])][int(r["sample"])] = bool(r["correct"])
    return table


def _ordered_conditions(names: Iterable[str], settings: Mapping[str, Any], baseline: str) -> list[str]:
    declared = list(settings.get("conditions") or {})
    ordered = [n for n in declared if n in names] + sorted(n for n in names if n not in declared)
    if baseline in ordered:  # the baseline first: it is what the others are compared with
        ordered.remove(baseline)
        ordered.insert(0, baseline)
    return ordered


def summarize(
    records: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any] | None = None,
    *,
    baseline: str = "baseline",
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
    duplicates: int = 0,
) -> Summary:
    """Summarise result lines (one per graded sample; keys must be unique, see :func:`merge_results`).

    ``settings``: the run's settings (from run.json or :func:`settings_from_records`); its ``n`` is the number
    of samples a problem needs to count as complete (default: the most samples any problem has).
    """
    if not records:
        raise StepscopeError("there are no results to summarise yet")
    settings = dict(settings or settings_from_records(records))
    table = _outcomes(records)
    names = _ordered_conditions(table, settings, baseline)
    n = int(settings.get("n") or max(len(s) for per in table.values() for s in per.values()))
    seen = sorted({pid for per in table.values() for pid in per})
    complete = [pid for pid in seen if all(set(table[c].get(pid, {})) == set(range(n)) for c in names)]
    if not complete:
        raise StepscopeError(f"no problem has all {n} samples in every condition ({', '.join(names)}) yet; "
                             "let the run finish (or resume it) and summarise again")
    scores = {c: np.array([[table[c][pid][k] for k in range(n)] for pid in complete], dtype=float) for c in names}
    extra = _sample_stats(records, set(complete))
    conds = [_condition_summary(c, scores[c], extra.get(c, (math.nan, math.nan)), settings, n_boot, alpha, seed)
             for c in names]
    comps = [_compare(c, baseline, scores[baseline], scores[c], n_boot, alpha, seed)
             for c in names if c != baseline and baseline in scores]
    return Summary(settings, n, conds, comps, len(seen), [p for p in seen if p not in set(complete)],
                   duplicates, n_boot, seed, baseline)


def _sample_stats(records: Iterable[Mapping[str, Any]], keep: set[str]) -> dict[str, tuple[float, float]]:
    """condition -> (mean new tokens, share of samples that hit the token limit) over the kept problems."""
    tokens: dict[str, list[float]] = defaultdict(list)
    capped: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        if str(r["problem_id"]) in keep:
            tokens[r["condition"]].append(float(r.get("new_tokens") or 0))
            capped[r["condition"]].append(r.get("stop") == "length")
    return {c: (float(np.mean(tokens[c])), float(np.mean(capped[c]))) for c in tokens}


def _condition_summary(name: str, scores: np.ndarray, extra: tuple[float, float], settings: Mapping[str, Any],
                       n_boot: int, alpha: float, seed: int) -> ConditionSummary:
    problems, n = scores.shape
    correct = scores.sum(axis=1).astype(int)
    passk = {k: mean_pass_at_k(((n, int(c)) for c in correct), k) for k in pass_at_k_values(n)}
    pass1 = bootstrap_ci(scores.mean(axis=1), n_boot=n_boot, alpha=alpha, seed=seed)
    stepflow = (settings.get("conditions") or {}).get(name)
    return ConditionSummary(name, problems, problems * n, pass1, passk, extra[0], extra[1], stepflow)


def _compare(name: str, baseline: str, base: np.ndarray, cond: np.ndarray, n_boot: int, alpha: float,
             seed: int) -> Comparison:
    problems, n = base.shape
    a, b = base.mean(axis=1), cond.mean(axis=1)
    diff = paired_bootstrap_ci(a, b, n_boot=n_boot, alpha=alpha, seed=seed)
    if n == 1:
        fixed, broken = int(np.sum((a == 0) & (b == 1))), int(np.sum((a == 1) & (b == 0)))
        test = mcnemar_exact(fixed, broken)
        discordance = (fixed + broken) / problems
    else:
        right_a, right_b = a > 0.5, b > 0.5
        fixed, broken = int(np.sum(~right_a & right_b)), int(np.sum(right_a & ~right_b))
        test = sign_test(b - a)
        discordance = (fixed + broken) / problems  # majority outcomes, the binary outcome the power formula needs
    return Comparison(name, baseline, problems, diff, test, fixed, broken, discordance,
                      _power_note(discordance, problems))


def _power_note(discordance: float, problems: int) -> str:
    if discordance < POWER_DELTA:
        return (f"Only {discordance:.1%} of the {problems} problems changed outcome between the two runs; a paired "
                f"change of {POWER_DELTA * 100:.0f} points needs at least {POWER_DELTA:.0%} of problems to flip, "
                "so no sample size computed at this discordance would detect it.")
    return paired_power_explanation(discordance, POWER_DELTA)


# --- settings -----------------------------------------------------------------------------------------------


def settings_from_records(records: Sequence[Mapping[str, Any]]) -> dict:
    """Run settings read back from the ``config`` of result lines (for a results file without run.json)."""
    settings: dict[str, Any] = {"conditions": {}}
    for r in records:
        cfg = r.get("config") or {}
        for key in ("model", "dataset", "n", "temperature", "top_p", "max_new_tokens", "seed", "run", "sampling"):
            if key in cfg and key not in settings:
                settings[key] = cfg[key]
        settings["conditions"].setdefault(str(r["condition"]), cfg.get("stepflow"))
    return settings


def settings_from_run(run: Mapping[str, Any]) -> dict:
    """Summary settings from a run.json (its config plus the resolved StepFlow layers, when recorded)."""
    config = RunConfig.from_dict(run["config"])
    s = config.sampling
    dataset = dict(config.dataset)
    return {"model": config.model, "dataset": dataset.pop("name", "?"), "dataset_params": dataset,
            "problems": config.num_problems, "n": s.n, "temperature": s.temperature, "top_p": s.top_p,
            "max_new_tokens": s.max_new_tokens, "seed": s.seed, "sampling": s.config.to_dict(),
            "profile": config.profile, "conditions": {c.name: c.intervention_dict() for c in config.conditions},
            "layers": run.get("info", {}).get("layers", {}), "run": run.get("run_id"),
            "stepscope_version": run.get("info", {}).get("stepscope_version")}


# --- presentation ---------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def _stepflow_text(cfg: Mapping[str, Any] | None, layers: Mapping[str, Any] | None) -> str:
    if cfg is None:
        return "off (plain decoding)"
    layers = layers or {}
    if cfg.get("kind", "stepflow") != "stepflow":  # a plug-in intervention describes itself
        from ..stepflow.intervention import describe_dict

        text = describe_dict(cfg)
        return text + (f", on {_layer_text(layers['layers'], None, '', None)}" if layers.get("layers") else "")
    parts = []
    if cfg.get("oeb"):
        where = _layer_text(layers.get("oeb"), cfg.get("oeb_layers"), "bottom", cfg.get("band_fraction"))
        parts.append(f"OEB on {where}, tau_max={cfg.get('tau_max')}")
    if cfg.get("smi"):
        where = _layer_text(layers.get("smi"), cfg.get("smi_layers"), "top", cfg.get("band_fraction"))
        window = "whole step" if cfg.get("smi_window") is None else f"last {cfg.get('smi_window')} tokens"
        at = ", also at the summary" if cfg.get("smi_at_summary") else ""
        parts.append(f"SMI on {where}, alpha={cfg.get('alpha')} ({window}{at})")
    return "; ".join(parts) or "nothing enabled"


def _layer_text(resolved, given, side: str, fraction) -> str:
    layers = resolved if resolved is not None else given
    if layers is None:
        share = f"{fraction:.0%}" if isinstance(fraction, (int, float)) else "band"
        return f"the {side} {share} of layers"
    xs = sorted(int(x) for x in layers)
    runs, start = [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            runs.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return "layers " + (",".join(runs) or "none")


# sampling settings shown in the table only when set (a run made before they existed has them off)
_SAMPLING_ROWS: tuple[tuple[str, str, Any], ...] = (
    ("top_k", "top-k", 0), ("min_p", "min-p", 0.0), ("repetition_penalty", "repetition penalty", 1.0),
    ("stop", "stop strings", []),
)


def _sampling_rows(sampling: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    sampling = sampling or {}
    rows = []
    for key, label, off in _SAMPLING_ROWS:
        value = sampling.get(key, off)
        if value != off:
            rows.append((label, ", ".join(json.dumps(v, ensure_ascii=False) for v in value) if key == "stop"
                         else value))
    return rows


def _settings_table(s: Summary) -> list[str]:
    st = s.settings
    params = st.get("dataset_params") or {}
    shown = {k: v for k, v in params.items() if v not in (None, {}, [], "")}
    dataset = str(st.get("dataset", "?")) + (f" ({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")
    rows = [("model", st.get("model", "?")), ("dataset", dataset),
            ("problems", f"{s.problems} complete of {s.problems_seen} seen"
             + (f" ({len(s.incomplete)} incomplete, left out)" if s.incomplete else "")),
            ("samples per problem (n)", s.n), ("temperature", st.get("temperature", "?")),
            ("top-p", st.get("top_p", "?")), *_sampling_rows(st.get("sampling")),
            ("max new tokens", st.get("max_new_tokens", "?")), ("seed", st.get("seed", "?"))]
    layers = st.get("layers") or {}
    for c in s.conditions:
        what = "StepFlow" if (c.stepflow or {}).get("kind", "stepflow") == "stepflow" else "intervention"
        rows.append((f"{what} in `{c.name}`", _stepflow_text(c.stepflow, layers.get(c.name))))
    if s.duplicates:
        rows.append(("duplicate lines dropped", s.duplicates))
    out = ["# Evaluation summary", "", "| setting | value |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return out


def _accuracy_table(s: Summary) -> list[str]:
    level = s.conditions[0].pass1.level
    ks = [k for k in s.conditions[0].pass_at_k if k != 1]
    head = ["condition", "problems", "samples", f"pass@1 % ({level:.0%} CI)"] + [f"pass@{k} %" for k in ks] + [
        "mean new tokens", "hit token limit %"]
    out = ["## Accuracy", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in s.conditions:
        cells = [f"`{c.name}`", str(c.problems), str(c.samples),
                 f"{_pct(c.pass1.estimate)} [{_pct(c.pass1.low)}, {_pct(c.pass1.high)}]"]
        cells += [_pct(c.pass_at_k[k]) for k in ks]
        cells += [f"{c.mean_new_tokens:.0f}" if not math.isnan(c.mean_new_tokens) else "n/a", _pct(c.truncated_share)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(f"pass@1 is the mean accuracy over samples; pass@k uses the unbiased estimator; intervals are "
               f"percentile bootstraps over problems ({s.n_boot} resamples, seed {s.boot_seed}).")
    return out


def _comparison_table(s: Summary) -> list[str]:
    if not s.comparisons:
        return []
    head = ["condition", "vs", "Δ pass@1 points (CI)", "p-value", "test", "fixed", "broken", "verdict"]
    out = ["", "## Paired comparison", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in s.comparisons:
        d = c.difference
        out.append("| " + " | ".join([
            f"`{c.condition}`", f"`{c.baseline}`", f"{_signed(d.estimate)} [{_signed(d.low)}, {_signed(d.high)}]",
            f"{c.test.p_value:.3g}", "McNemar exact" if s.n == 1 else "sign test (per-problem)",
            str(c.fixed), str(c.broken), c.verdict]) + " |")
    out += ["", "Δ is the mean per-problem accuracy change against the baseline on the same problems and seeds, "
            "with a paired bootstrap interval; a change whose interval includes 0 is within noise. Fixed / broken: "
            "problems the baseline got wrong and the condition right, and the reverse"
            + (" (right = more than half of the samples right)." if s.n > 1 else ".")]
    out += [""] + [f"- `{c.condition}`: {c.power_note}" for c in s.comparisons]
    return out


# --- report ---------------------------------------------------------------------------------------------------


def load_summary(path: str | os.PathLike | Sequence[str | os.PathLike], *, baseline: str = "baseline",
                 n_boot: int = 10000, alpha: float = 0.05, seed: int = 0) -> Summary:
    """Summarise a run directory (all its results files merged) or one results file, or several of them
    together (e.g. an imported baseline and a StepFlow eval run of the same problems: paired per problem).

    Settings come from the directory's run.json when there is one, else from the result lines.
    """
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise StepscopeError("give a run directory or a results file to summarise")
    for p in paths:
        if not p.exists():
            raise StepscopeError(f"no such file or directory: {p}")
    if len(paths) == 1:
        records, duplicates = merge_results(paths[0])
    else:  # several sources: each directory's files, one list, each (problem, sample, condition) once
        files = [f for p in paths for f in (result_files(p) if p.is_dir() else [p])]
        records, duplicates = merge_results(files)
    where = paths[0] if len(paths) == 1 else " + ".join(map(str, paths))
    if not records:
        raise StepscopeError(f"{where} holds no results yet")
    ungraded = sum(1 for r in records if r.get("correct") is None)
    if ungraded:  # imported without grading: counting them as wrong would be silently false
        raise StepscopeError(f"{ungraded} of {len(records)} samples in {where} are not graded; re-import them with "
                             "--grade (gold from --dataset NAME or the file) or --source-metric NAME")
    run = read_run_file(paths[0] if paths[0].is_dir() else paths[0].parent) if len(paths) == 1 else None
    settings = settings_from_run(run) if run is not None else settings_from_records(records)
    return summarize(records, settings, baseline=baseline, n_boot=n_boot, alpha=alpha, seed=seed,
                     duplicates=duplicates)


def report(path: str | os.PathLike | Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None,
           plot: bool = True, baseline: str = "baseline", n_boot: int = 10000, alpha: float = 0.05, seed: int = 0,
           formats: Sequence[str] = ("png",)) -> tuple[Summary, list[Path]]:
    """:func:`load_summary` and write it: a directory gets ``summary.{json,md,png}``, a file ``X.jsonl`` gets
    ``X.summary.*`` beside it (or in ``out``); several sources are written as the first one would be."""
    summary = load_summary(path, baseline=baseline, n_boot=n_boot, alpha=alpha, seed=seed)
    path = Path(path) if isinstance(path, (str, os.PathLike)) else Path(path[0])
    directory = path if path.is_dir() else path.parent
    stem = "summary" if path.is_dir() else f"{path.stem}.summary"
    return summary, summary.write(Path(out) if out is not None else directory, stem=stem, plot=plot,
                                  formats=formats)
