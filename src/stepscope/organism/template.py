"""The organism's tokenizer and chat template, built offline.

A byte-level BPE (so any text encodes, nothing is unknown) trained on generated problems; see ``PIECES`` for how
text is cut before the BPE. ``<think>`` and ``</think>`` are added tokens that are *not* special, as in
DeepSeek-R1-Distill, so decoding with ``skip_special_tokens=True`` keeps them. The chat template ends the
generation prompt with ``<think>\\n``, so the model's response is ``thinking\\n</think>\\n\\nsummary`` then EOS.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
GENERATION_PROMPT = f"<|assistant|>\n{THINK_OPEN}\n"

# A previous assistant turn keeps only its answer (R1-Distill drops the reasoning of past turns the same way).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "<|assistant|>\n{{ content }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + GENERATION_PROMPT + "{% endif %}"
)


# How text is cut before the BPE (the first alternative that matches wins). Measured on models trained from
# scratch (docs/organism.md): a look-up such as "the number after the latest 'Mia has'" is learnt several times
# faster when its key is the single token just before the answer, so a name with the word after it ("Mia has",
# "Mia's friend") is one piece, and so is a number of up to two digits (copying it is then one step too). Inside
# an arithmetic expression ("20 + 14 = 34") digits are single pieces instead: digit-wise addition with a carry
# is learnt reliably, a 100 x 100 table of whole-number tokens is not.
PIECES = "|".join([
    r" ?[A-Z][a-z]+(?:'s friend| has)(?![A-Za-z])",
    r" ?[0-9](?=[0-9]? [-+*=] )",  # digits of a number followed by an operator
    r"(?<=[-+*=]) [0-9]",  # first digit after an operator
    r"(?<=[-+*=] [0-9])[0-9]",  # second digit after an operator
    r" ?[0-9]{1,2}",  # any other number: one piece per two digits
    r" ?[A-Za-z]+",
    r" ?[^\sA-Za-z0-9]+",
    r"\s+(?!\S)",
    r"\s+",
])


def prompt_text(question: str) -> str:
    """The generation prompt for ``question``, as the chat template renders it."""
    return f"{BOS}<|user|>\n{question}\n{GENERATION_PROMPT}"


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """Train the BPE on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast`` with the chat template.

    Training is deterministic for a given corpus (the BPE trainer breaks count ties by the pair itself).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # BOS first when plain text is encoded with special tokens: token 0 is the attention sink everywhere.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), padding_side="left", model_max_length=1024,
    )
    fast.add_tokens([THINK_OPEN, THINK_CLOSE])  # not special: they stay visible in decoded text
    fast.chat_template = CHAT_TEMPLATE
    return fast
