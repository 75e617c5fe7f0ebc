"""``stepscope calibrate``: StepFlow layer bands chosen from Step-Saliency on the user's own problems.

The paper fixes OEB to the bottom quarter of layers and SMI to the top quarter for every model, and names the
choice as model-specific. Here the bands come from the flow itself, measured on a small calibration set:

- **OEB band**: the contiguous block of layers (the default band's size) where thinking steps take the least
  saliency from the question (lowest ``question_reach``), among layers that can see the question at all
  (a sliding-window layer whose window is shorter than the calibration traces cannot: OEB would be inert).
- **SMI band**: the contiguous block where the summary leans most on itself and the last steps (highest
  ``summary_recency_share``, Deep Decay).

Contiguous blocks, like the paper's bands, keep the choice stable on 8-32 traces. Each curve is the mean over
traces with a trace-resampling bootstrap interval, and the evidence (curves, windows, scores of every candidate
block, the reason) is written beside the choice. An optional grid over ``tau_max`` / ``alpha`` is scored on
held-out problems with the paired test (:func:`score_grid`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_text_atomic
from .bands import Bands
from .defaults import BAND_FRACTION
from .errors import StepscopeError
from .stepflow.config import StepFlowConfig
from .windows import layer_windows, sees_bridge

__all__ = ["Calibration", "calibrate", "calibrate_from_saliency", "choose_block", "load_bands", "score_grid"]

OEB_METRIC = "question_reach"  # lower is worse: OEB goes where the question is reached least
SMI_METRIC = "summary_recency_share"  # higher is worse: SMI goes where Deep Decay is strongest
BANDS_VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """Chosen bands with their evidence. ``curves[name]``: per-layer mean over traces (None where undefined)."""

    num_layers: int
    band_size: int
    oeb_layers: tuple[int, ...]
    smi_layers: tuple[int, ...]
    n_traces: int
    curves: dict[str, list[float | None]]
    curve_ci: dict[str, list[list[float | None]]]
    windows: list[int | None]
    oeb_eligible: list[bool]
    reasons: dict[str, str]
    block_scores: dict[str, list[float | None]]
    tau_max: float | None = None
    alpha: float | None = None
    grid: list[dict] = field(default_factory=list)
    model: str | None = None

    def to_config(self, base: StepFlowConfig | None = None) -> StepFlowConfig:
        """A StepFlowConfig with these bands (and grid-chosen strengths, if any) on top of ``base``."""
        base = base or StepFlowConfig()
        changes: dict[str, Any] = {"oeb_layers": self.oeb_layers, "smi_layers": self.smi_layers}
        if self.tau_max is not None:
            changes["tau_max"] = self.tau_max
        if self.alpha is not None:
            changes["alpha"] = self.alpha
        return StepFlowConfig(**{**base.to_dict(), **changes})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["oeb_layers"], d["smi_layers"] = list(self.oeb_layers), list(self.smi_layers)
        d["version"] = BANDS_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        d = {k: v for k, v in d.items() if k != "version"}
        d["oeb_layers"], d["smi_layers"] = tuple(d["oeb_layers"]), tuple(d["smi_layers"])
        return cls(**d)

    def save(self, path: str | Path, *, plot: bool = True) -> list[Path]:
        """Write ``bands.json`` (and ``bands.png`` beside it unless ``plot=False``)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "bands.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2))
        written = [path]
        if plot:
            written.append(self.plot(path.with_suffix(".png")))
        return written

    def plot(self, path: str | Path) -> Path:
        """Per-layer curves with their intervals, the chosen bands shaded, sliding layers marked."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.0, 3.6))
        ax = fig.add_subplot()
        x = np.arange(self.num_layers)
        for name, colour in ((OEB_METRIC, "tab:blue"), (SMI_METRIC, "tab:red"), ("local_share", "tab:gray")):
            y = np.array([np.nan if v is None else v for v in self.curves.get(name, [])], dtype=float)
            if y.size != self.num_layers:
                continue
            ax.plot(x, y, color=colour, label=name)
            ci = self.curve_ci.get(name)
            if ci:
                lo = np.array([np.nan if c[0] is None else c[0] for c in ci], dtype=float)
                hi = np.array([np.nan if c[1] is None else c[1] for c in ci], dtype=float)
                ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
        bands = ((self.oeb_layers, "tab:blue", "OEB band"), (self.smi_layers, "tab:red", "SMI band"))
        for layers, colour, label in bands:
            if layers:
                ax.axvspan(min(layers) - 0.5, max(layers) + 0.5, color=colour, alpha=0.08, label=label)
        for i, w in enumerate(self.windows):
            if w is not None:
                ax.axvline(i, color="k", alpha=0.12, linewidth=0.8)
        ax.set_xlabel("layer" + (" (thin lines: sliding-window layers)" if any(self.windows) else ""), fontsize=9)
        ax.set_ylabel("share of incoming saliency", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_title(f"calibrated bands from {self.n_traces} traces", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=200)
        return path

    def describe(self) -> str:
        lines = [f"calibrated on {self.n_traces} traces, band size {self.band_size} of {self.num_layers} layers:",
                 f"  OEB layers {_span(self.oeb_layers)}: {self.reasons.get('oeb', '')}",
                 f"  SMI layers {_span(self.smi_layers)}: {self.reasons.get('smi', '')}"]
        if self.tau_max is not None or self.alpha is not None:
            lines.append(f"  strengths from the grid: tau_max={self.tau_max}, alpha={self.alpha}")
        return "\n".join(lines)


def _span(layers: Sequence[int]) -> str:
    return f"{min(layers)}-{max(layers)}" if layers else "none"


def choose_block(scores: Sequence[float | None], size: int, *, lowest: bool,
                 eligible: Sequence[bool] | None = None) -> tuple[int | None, list[float | None]]:
    """The start of the contiguous ``size``-layer block with the lowest (or highest) mean score.

    A block is a candidate only when every layer in it is eligible and has a score. Returns the chosen start
    (None if no block qualifies) and every start's block mean (None for non-candidates). Ties go to the
    shallower block.
    """
    n = len(scores)
    if size < 1 or size > n:
        raise StepscopeError(f"band size {size} does not fit {n} layers")
    values = [math.nan if s is None else float(s) for s in scores]
    ok = [not math.isnan(v) and (eligible is None or eligible[i]) for i, v in enumerate(values)]
    means: list[float | None] = []
    for start in range(n - size + 1):
        if all(ok[start:start + size]):
            means.append(float(np.mean(values[start:start + size])))
        else:
            means.append(None)
    candidates = [(m, i) for i, m in enumerate(means) if m is not None]
    if not candidates:
        return None, means
    best = min(candidates, key=lambda mi: (mi[0] if lowest else -mi[0], mi[1]))
    return best[1], means


def _mean_curves(results, n_boot: int = 1000, seed: int = 0):
    """Per-metric per-layer mean over traces (NaN-aware) and a trace-bootstrap 95% interval."""
    names = (OEB_METRIC, SMI_METRIC, "local_share", "summary_thinking_share")
    rng = np.random.default_rng(seed)
    curves: dict[str, list[float | None]] = {}
    cis: dict[str, list[list[float | None]]] = {}
    for name in names:
        rows = [r.metrics.get(name) for r in results]
        rows = [np.asarray(v, dtype=float) for v in rows if v is not None]
        if not rows:
            continue
        mat = np.stack(rows)  # (traces, layers)
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(mat, axis=0)
            picks = rng.integers(0, len(mat), size=(n_boot, len(mat)))
            boots = np.nanmean(mat[picks], axis=1)  # (n_boot, layers)
            lo, hi = np.nanpercentile(boots, 2.5, axis=0), np.nanpercentile(boots, 97.5, axis=0)
        curves[name] = [None if math.isnan(v) else float(v) for v in mean]
        cis[name] = [[None if math.isnan(a) else float(a), None if math.isnan(b) else float(b)] for a, b in zip(lo, hi)]
    return curves, cis


def calibrate_from_saliency(results: Sequence, *, windows: Sequence[int | None] | None = None,
                            band_fraction: float = BAND_FRACTION, model: str | None = None) -> Calibration:
    """Choose bands from already computed :class:`~stepscope.saliency.StepSaliency` results."""
    results = list(results)
    if not results:
        raise StepscopeError("no saliency results to calibrate from")
    n_layers = results[0].num_layers
    if any(r.num_layers != n_layers for r in results):
        raise StepscopeError("the saliency results come from models with different numbers of layers")
    size = Bands(n_layers, band_fraction).size
    windows = list(windows) if windows is not None else [None] * n_layers
    if len(windows) != n_layers:
        raise StepscopeError(f"got {len(windows)} layer windows for {n_layers} layers")
    longest = max(int(r.meta.get("tokens") or r.counts.shape[0]) for r in results)
    eligible = [sees_bridge(w, longest) for w in windows]
    curves, cis = _mean_curves(results)
    reasons: dict[str, str] = {}
    default = StepFlowConfig(band_fraction=band_fraction).resolve(n_layers)
    oeb_scores = curves.get(OEB_METRIC)
    oeb_start: int | None = None
    oeb_blocks: list[float | None] = []
    if oeb_scores is not None:
        oeb_start, oeb_blocks = choose_block(oeb_scores, size, lowest=True, eligible=eligible)
    if oeb_start is None:
        oeb = tuple(sorted(i for i in default.oeb_layers if eligible[i]))
        reasons["oeb"] = ("no trace had thinking steps to measure question reach; kept the default band"
                          if oeb_scores is None else "no block of eligible layers; kept the default band")
        if len(oeb) < len(default.oeb_layers):
            reasons["oeb"] += " without its sliding-window layers"
    else:
        oeb = tuple(range(oeb_start, oeb_start + size))
        reasons["oeb"] = (f"lowest mean question reach ({oeb_blocks[oeb_start]:.3f}) of "
                          f"{sum(m is not None for m in oeb_blocks)} candidate blocks")
        skipped = [i for i, e in enumerate(eligible) if not e]
        if skipped:
            reasons["oeb"] += f"; layers {_list(skipped)} excluded (their window does not reach the question)"
    smi_scores = curves.get(SMI_METRIC)
    smi_start: int | None = None
    smi_blocks: list[float | None] = []
    if smi_scores is not None:
        smi_start, smi_blocks = choose_block(smi_scores, size, lowest=False)
    if smi_start is None:
        smi = tuple(sorted(default.smi_layers))
        reasons["smi"] = "no trace had a summary to measure Deep Decay; kept the default band"
    else:
        smi = tuple(range(smi_start, smi_start + size))
        reasons["smi"] = (f"highest mean summary recency share ({smi_blocks[smi_start]:.3f}) of "
                          f"{sum(m is not None for m in smi_blocks)} candidate blocks")
    return Calibration(n_layers, size, oeb, smi, len(results), curves, cis, windows, eligible, reasons,
                       {"oeb": oeb_blocks, "smi": smi_blocks}, model=model)


def _list(xs: Sequence[int]) -> str:
    return ",".join(str(x) for x in xs)


def calibrate(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 256,
              band_fraction: float = BAND_FRACTION, batch_size: int = 8, temperature: float = 0.0, seed: int = 0,
              progress: bool = True) -> Calibration:
    """Generate baseline traces for ``questions``, measure Step-Saliency, and choose the bands."""
    from .generation import generate
    from .saliency import step_saliency

    if not questions:
        raise StepscopeError("no calibration questions given")
    traces = generate(model, tokenizer, list(questions), max_new_tokens=max_new_tokens, temperature=temperature,
                      seed=seed, batch_size=batch_size, progress=progress)
    usable = [t for t in traces if len(t.steps) >= 2]
    if not usable:
        raise StepscopeError("no calibration trace has a response step; raise --max-new-tokens")
    results = step_saliency(model, tokenizer, usable, band_fraction=band_fraction, progress=progress)
    results = results if isinstance(results, list) else [results]
    return calibrate_from_saliency(results, windows=layer_windows(model.config), band_fraction=band_fraction,
                                   model=getattr(model, "name_or_path", None))


def load_bands(path: str | Path) -> Calibration:
    """Read a ``bands.json`` written by :meth:`Calibration.save` (one-line errors for bad files)."""
    path = Path(path)
    if path.is_dir():
        path = path / "bands.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StepscopeError(f"no bands file at {path}; write one with `stepscope calibrate`") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StepscopeError(f"cannot read {path} as a bands file: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != BANDS_VERSION:
        raise StepscopeError(f"{path} is not a stepscope bands file (version {BANDS_VERSION})")
    try:
        return Calibration.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise StepscopeError(f"{path} is missing fields of a bands file: {exc}") from None


def score_grid(model, tokenizer, problems: Sequence, calibration: Calibration, *, tau_grid: Sequence[float] = (),
               alpha_grid: Sequence[float] = (), max_new_tokens: int = 256, batch_size: int = 8,
               workers: int = 2, progress: bool = True) -> Calibration:
    """Score ``tau_max`` x ``alpha`` settings (with the calibrated bands) on held-out ``problems``.

    Each setting is compared with plain decoding on the same problems (greedy): the accuracy difference, a
    paired bootstrap interval and the exact McNemar p-value, Holm-adjusted over the grid. The best setting is
    kept only when its Holm-adjusted p is below 0.05; otherwise the paper's strengths stay and the grid says so.
    """
    from .evaluation.datasets import build_user_message
    from .evaluation.graders import grade_many
    from .evaluation.stats import holm, mcnemar_exact, paired_bootstrap_ci
    from .generation import generate
    from .profiles import get_profile

    problems = list(problems)
    if not problems:
        raise StepscopeError("no held-out problems to score the grid on")
    base = calibration.to_config()
    taus = list(tau_grid) or [base.tau_max]
    alphas = list(alpha_grid) or [base.alpha]
    profile = get_profile(None, tokenizer)
    prompts = [build_user_message(p, profile) for p in problems]

    def accuracy(cfg):
        traces = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          stepflow=cfg, progress=progress)
        grades = grade_many(problems, [t.response for t in traces], workers=workers)
        return np.array([g.correct for g in grades], dtype=float)

    plain = accuracy(None)
    rows: list[dict[str, Any]] = []  # one JSON row per grid setting
    for tau in taus:
        for alpha in alphas:
            cfg = StepFlowConfig(**{**base.to_dict(), "tau_max": float(tau), "alpha": float(alpha)})
            acc = accuracy(cfg)
            diff = acc - plain
            ci = paired_bootstrap_ci(plain, acc)
            test = mcnemar_exact(int(((plain == 0) & (acc == 1)).sum()), int(((plain == 1) & (acc == 0)).sum()))
            rows.append({"tau_max": float(tau), "alpha": float(alpha), "accuracy": float(acc.mean()),
                         "baseline": float(plain.mean()), "difference": float(diff.mean()),
                         "ci": [ci.low, ci.high], "p": test.p_value})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adj
    best = max(rows, key=lambda r: r["difference"])
    keep = best["difference"] > 0 and best["p_holm"] is not None and best["p_holm"] < 0.05
    fields = asdict(calibration)
    fields.update(grid=rows, tau_max=best["tau_max"] if keep else None, alpha=best["alpha"] if keep else None)
    fields["oeb_layers"], fields["smi_layers"] = calibration.oeb_layers, calibration.smi_layers
    reasons = dict(calibration.reasons)
    reasons["grid"] = (f"tau_max={best['tau_max']}, alpha={best['alpha']}: {best['difference']:+.3f} "
                       f"(Holm p={best['p_holm']:.3g})" if keep else
                       f"no setting beat plain decoding after Holm correction over {len(rows)} settings "
                       f"(best {best['difference']:+.3f}, p={best['p_holm']:.3g}); strengths left at the defaults")
    fields["reasons"] = reasons
    return Calibration(**fields)
