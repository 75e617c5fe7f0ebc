"""Evaluation building blocks: benchmark problems, answer grading, statistics (see SPEC section 4)."""

from .datasets import (
    DATASETS,
    DatasetSpec,
    Problem,
    build_user_message,
    load_problems,
    load_problems_from_file,
    parse_indices,
    parse_rg_params,
)
from .graders import Grade, GradingConfig, extract_answer, grade, grade_many, register_grader

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Grade",
    "GradingConfig",
    "Problem",
    "build_user_message",
    "extract_answer",
    "grade",
    "grade_many",
    "load_problems",
    "load_problems_from_file",
    "parse_indices",
    "parse_rg_params",
    "register_grader",
]
