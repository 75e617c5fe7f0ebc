"""Turning a user's question into the prompt token ids a model is generated from."""

from __future__ import annotations

from .errors import StepscopeError


def prompt_ids(tokenizer, question: str, *, system: str | None = None, chat: bool | None = None) -> list[int]:
    """Token ids of the generation prompt for ``question``.

    With a chat template (the default when the tokenizer has one) the question is the user turn and the
    assistant turn is opened, exactly as for generation; otherwise the question is encoded as is.
    """
    if not isinstance(question, str) or not question.strip():
        raise StepscopeError("the question is empty; pass the text of a problem (for example --question '...')")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(question, add_special_tokens=True)["input_ids"])
    return ids
