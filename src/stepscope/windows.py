"""Per-layer attention windows from a model's config: which layers slide, and how far they see.

Families say it differently (``layer_types`` with ``"sliding_attention"`` entries in GPT-OSS, Gemma 2/3 and
recent Qwen configs; one ``sliding_window`` for every layer in Mistral-style configs; ``use_sliding_window``
with ``max_window_layers`` in Qwen2), so this reads the config, not the family name.
"""

from __future__ import annotations

__all__ = ["layer_windows", "sees_bridge"]


def layer_windows(config) -> list[int | None]:
    """For each decoder layer, its sliding window in tokens, or None for full attention."""
    text = getattr(config, "text_config", None) or config
    n = int(text.num_hidden_layers)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is not None and len(types) == n:
        return [int(window) if (t == "sliding_attention" and window) else None for t in types]
    if not window:
        return [None] * n
    if getattr(text, "use_sliding_window", None) is False:
        return [None] * n
    max_window_layers = getattr(text, "max_window_layers", None)
    if getattr(text, "use_sliding_window", None) and max_window_layers is not None:
        # Qwen2: layers from max_window_layers on use the window
        return [int(window) if i >= int(max_window_layers) else None for i in range(n)]
    return [int(window)] * n


def sees_bridge(window: int | None, trace_tokens: int) -> bool:
    """Whether a layer with ``window`` lets every token of a ``trace_tokens``-long trace see its first token."""
    return window is None or window >= trace_tokens
