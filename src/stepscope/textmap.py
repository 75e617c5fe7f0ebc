"""Token ids -> text, one token at a time, with each token's exact character span.

Decoding a whole sequence and re-tokenising pieces drifts; instead every token's text is the difference
between decoding a short window that ends with it and the same window without it. Multi-byte characters split
over several byte-level tokens are attributed to the token that completes them (earlier ones get ""). The
work per token is bounded by the window, so streaming and offline decoding are both O(1) per token and give
the same texts by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDecoder:
    tokenizer: Any  # a transformers tokenizer (anything with its ``decode``)
    ids: list[int] = field(default_factory=list)
    _prefix: int = 0  # start of the context window
    _read: int = 0  # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self.ids.append(int(token_id))
        window = self.ids[self._prefix :]
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(window)
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_texts(tokenizer, token_ids) -> list[str]:
    """Texts of ``token_ids``; ``"".join(result)`` is the decoded sequence.

    An incomplete multi-byte character at the very end (a generation cut mid-character) is dropped, exactly as a
    streaming decoder would hold it back, so offline and online texts agree.
    """
    dec = IncrementalDecoder(tokenizer)
    return [dec.push(t) for t in token_ids]


def offsets_from_texts(texts: list[str], start: int = 0) -> list[tuple[int, int]]:
    out, pos = [], start
    for t in texts:
        out.append((pos, pos + len(t)))
        pos += len(t)
    return out
