"""Flow analysis: do correct and wrong traces differ in Step-Saliency, and what does StepFlow change?

``stepscope.analyze(...)`` (:mod:`.api`) runs it; :mod:`.compare` holds the correct-vs-wrong tests,
:mod:`.mechanism` the per-component mechanism check, :mod:`.failing` the failing-step analysis.
"""

__all__ = ["AnalysedTrace", "GroupComparison", "compare_groups"]


def __getattr__(name: str):
    # lazy: importing the package (e.g. for its defaults) must not load torch
    if name in __all__:
        from . import compare

        return getattr(compare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
