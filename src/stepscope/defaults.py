"""Default settings that the library and the command line share, importable without torch.

The dataclasses (:class:`~stepscope.bands.Bands`, ``SaliencyOptions``, ``StepFlowConfig``), ``step_saliency``'s
signature and the command-line flags all read their defaults from here.
"""

from __future__ import annotations

# Layer bands: shallow = the bottom quarter of layers, deep = the top quarter (rounded up).
BAND_FRACTION = 0.25

# Step-Saliency
SALIENCY_TARGETS = ("all", "generated", "summary")  # which next-token losses make up L
SALIENCY_TARGET = "all"
CHUNK_MB = 256.0  # memory budget of one chunk of query rows
KEEP_MB = 1024.0  # memory for keeping top layers' graphs from the first pass (0: recompute all)

# StepFlow (the paper's values for every model)
TAU_MAX = 0.15  # OEB: the bridge mass a head is lifted to (at most)
ALPHA = 0.06  # SMI strength
