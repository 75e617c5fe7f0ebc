"""Tiny random models and an offline tokenizer, for tests, benchmarks and users' own hermetic tests.

``tiny_tokenizer(profile)`` trains a small byte-level BPE on a built-in corpus (well under a second) and gives it
the chat template of a ``plain``, ``think`` or ``harmony`` model. ``tiny_model(family, tokenizer)`` builds a 2-4
layer Llama / Qwen2 / Qwen3 / GPT-OSS model (sinks, sliding-window layers, grouped-query attention) from a config.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

SPECIAL = {
    "plain": ["<|pad|>", "<|im_start|>", "<|im_end|>"],
    "think": ["<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "harmony": ["<|pad|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"],
}

_CORPUS = [
    "The farmer has 12 sheep. He buys 7 more, so he has 19 sheep.",
    "Let me think. First, compute 3.14 times 2, which is 6.28. Then add 1.",
    "Wait, that is wrong! Is it 42? Yes, the answer is 42.",
    "Final answer: 27",
    "Step 1. Multiply the numbers.\n\nStep 2. Add the carry.",
    "Ünïcödé text: π ≈ 3.14159, naïve café, 東京, emoji 🙂 and more.",
    "So the total is 5 + 8 = 13. Therefore the result is 13.",
    "We need to find x. If 2x = 10, then x = 5. Check: 2 * 5 = 10.",
    "analysis final assistant user system",
]

TEMPLATES = {
    "plain": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "think": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    ),
    "harmony": (
        "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
    ),
}


@functools.cache
def _trained_bpe(vocab_size: int, profile: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL[profile], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(profile: str = "plain", vocab_size: int = 400):
    """A byte-level BPE tokenizer with the chat template of ``profile`` ("plain", "think" or "harmony")."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(vocab_size, profile)),
        eos_token="<|return|>" if profile == "harmony" else "<|im_end|>",
        pad_token="<|pad|>",
    )
    tok.chat_template = TEMPLATES[profile]
    return tok


def tiny_config(family: str, vocab_size: int, layers: int = 2):
    """Config of a tiny model of ``family``: llama, qwen2, qwen3, gpt_oss or mistral."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common, head_dim=8)
    if family == "gpt_oss":
        from transformers import GptOssConfig

        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        cfg = GptOssConfig(
            **dict(common, intermediate_size=32), head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=6, layer_types=types,
            # the config's __init__ takes **kwargs (popped in PreTrainedConfig) that its typed signature omits
            experts_implementation="eager",  # type: ignore[call-arg]
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        return cfg
    if family == "mistral":  # every layer a sliding window (short, so that tests outgrow it)
        from transformers import MistralConfig

        return MistralConfig(**common, sliding_window=5)
    raise ValueError(f"unknown tiny family {family!r}")


FAMILIES = ("llama", "qwen2", "qwen3", "gpt_oss")


def tiny_model(family: str, tokenizer, *, layers: int = 2, seed: int = 0, dtype=torch.float64, scale: float = 1.0):
    """A random ``family`` model; ``scale`` > 1 sharpens attention and logits (fewer near-ties)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tokenizer), layers)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(scale)
    if family == "gpt_oss":
        with torch.no_grad():  # give the sinks real mass so tests see their effect
            for m in model.modules():
                if hasattr(m, "sinks"):
                    m.sinks.copy_(torch.linspace(-1.0, 1.0, m.sinks.numel(), dtype=m.sinks.dtype))
    model.name_or_path = f"tiny-{family}"
    return model
