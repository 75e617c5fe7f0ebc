"""The thinking model organism: a small Llama trained from scratch to write ``<think>`` steps then an answer.

- :mod:`.tasks`: the seeded generator of chained word problems with gold ``<think>`` solutions (and the
  ``organism:<difficulty>`` evaluation set, :func:`organism_problems`).
- :mod:`.template`: the byte-level BPE tokenizer and the R1-style chat template.
- :mod:`.build`: the deterministic, resumable, cached training pipeline (``stepscope organism build``).
- :mod:`.checkpoint`: pickle-free checkpoints.
- :mod:`.evaluate`: held-out accuracy and where the first wrong step falls.

Importing this package does not import torch; the pipeline is ``stepscope.organism.build.build(BuildConfig())``.
"""

from .tasks import (
    DIFFICULTIES,
    Difficulty,
    Problem,
    check_response,
    extract_answer,
    get_difficulty,
    make_problem,
    organism_problems,
)

__all__ = [
    "DIFFICULTIES",
    "Difficulty",
    "Problem",
    "check_response",
    "extract_answer",
    "get_difficulty",
    "make_problem",
    "organism_problems",
]
