from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepscope.textmap import IncrementalDecoder, offsets_from_texts, token_texts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_token_texts_concatenate_to_the_decoded_text(tokenizers, text):
    tok = tokenizers["think"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "".join(token_texts(tok, ids)) == tok.decode(ids, skip_special_tokens=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_partial_characters_go_to_the_completing_token(tokenizers, data):
    tok = tokenizers["plain"]
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=30))
    texts = token_texts(tok, ids)
    full = tok.decode(ids, skip_special_tokens=False)
    # everything emitted is a prefix of the full decoding; at most a trailing incomplete character is held back
    assert full.startswith("".join(texts))
    assert len(full) - len("".join(texts)) <= 1 or full.endswith("\ufffd")


def test_streaming_equals_offline(tokenizers):
    tok = tokenizers["think"]
    ids = tok("naïve café 東京 🙂 costs 3.14", add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids] == token_texts(tok, ids)
    offs = offsets_from_texts(token_texts(tok, ids))
    assert offs[0][0] == 0 and all(a[1] == b[0] for a, b in pairwise(offs))
