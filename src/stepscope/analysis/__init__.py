"""Flow analysis: do correct and wrong traces differ in Step-Saliency, and what does StepFlow change?"""

from .compare import AnalysedTrace, GroupComparison, compare_groups, mechanism_check

__all__ = ["AnalysedTrace", "GroupComparison", "compare_groups", "mechanism_check"]
