"""Per-family facts as data: where the decoder layers and final norm live, and how logits are post-processed.

Anything not listed falls back to generic discovery (see :func:`family_facts`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyFacts:
    layers: str = "model.layers"  # attribute path of the decoder layer list
    final_norm: str = "model.norm"  # attribute path of the norm applied before the LM head
    logit_softcap_attr: str | None = None  # config attribute: logits = cap * tanh(logits / cap)
    logit_scale_attr: str | None = None  # config attribute: logits *= scale
    logit_divisor_attr: str | None = None  # config attribute: logits /= divisor


_LLAMA_LIKE = FamilyFacts()

FAMILIES: dict[str, FamilyFacts] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "gpt_oss": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": FamilyFacts(logit_softcap_attr="final_logit_softcapping"),
    "gemma3_text": FamilyFacts(logit_softcap_attr="final_logit_softcapping"),
    "cohere": FamilyFacts(logit_scale_attr="logit_scale"),
    "granite": FamilyFacts(logit_divisor_attr="logits_scaling"),
}


def family_facts(model) -> FamilyFacts | None:
    """Facts for ``model``'s family, or None when its layout is unknown (generic fallbacks apply)."""
    facts = FAMILIES.get(getattr(model.config, "model_type", ""))
    if facts is None:
        return None
    if _get_path(model, facts.layers) is None or _get_path(model, facts.final_norm) is None:
        return None
    return facts


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model):
    """The model's list of decoder layers."""
    facts = family_facts(model)
    if facts is not None:
        return _get_path(model, facts.layers)
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if module.__class__.__name__ == "ModuleList" and len(module) == n:
            return module
    return None


def final_norm(model):
    facts = family_facts(model)
    return None if facts is None else _get_path(model, facts.final_norm)


def postprocess_logits(model, logits):
    """Apply the family's logit transform (soft-capping, scaling) as its LM head does."""
    facts = family_facts(model)
    if facts is None:
        return logits
    cfg = model.config
    if facts.logit_scale_attr and getattr(cfg, facts.logit_scale_attr, None):
        logits = logits * getattr(cfg, facts.logit_scale_attr)
    if facts.logit_divisor_attr and getattr(cfg, facts.logit_divisor_attr, None):
        logits = logits / getattr(cfg, facts.logit_divisor_attr)
    if facts.logit_softcap_attr and getattr(cfg, facts.logit_softcap_attr, None):
        cap = getattr(cfg, facts.logit_softcap_attr)
        logits = cap * (logits / cap).tanh()
    return logits

