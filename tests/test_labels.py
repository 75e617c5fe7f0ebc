"""Label buffers: which absolute position each key slot of an attention call holds, checked against the caches of
``transformers`` themselves (dynamic, sliding window, static, static sliding window)."""

import pytest
import torch

from stepscope.labels import OTHER, QUESTION, BatchLabels, RowLabeler
from stepscope.profiles import get_profile

W, CAPACITY = 5, 16
CHUNKS = [4, 1, 1, 1, 1, 1, 1, 3, 1]  # a prefill, decoding steps past the window, a multi-token chunk, one more


def _layer(kind):
    from transformers.cache_utils import (
        DynamicLayer,
        DynamicSlidingWindowLayer,
        StaticLayer,
        StaticSlidingWindowLayer,
    )

    return {
        "dynamic": lambda: DynamicLayer(),
        "dynamic_sliding": lambda: DynamicSlidingWindowLayer(sliding_window=W),
        "static": lambda: StaticLayer(max_cache_len=CAPACITY),
        "static_sliding": lambda: StaticSlidingWindowLayer(max_cache_len=CAPACITY, sliding_window=W),
    }[kind]()


@pytest.mark.parametrize("kind", ["dynamic", "dynamic_sliding", "static", "static_sliding"])
def test_key_positions_are_what_the_cache_holds(kind):
    layer = _layer(kind)
    labels = BatchLabels.empty(1, CAPACITY, "cpu")
    L = 0
    for n in CHUNKS:
        # each key carries its absolute position + 1, so an empty (zero) slot reads -1
        new = torch.arange(L, L + n, dtype=torch.float64).view(1, 1, n, 1) + 1
        keys, _ = layer.update(new, new.clone())
        L += n
        labels.segment[:, :L] = QUESTION  # what pushing these tokens writes (any label but OTHER)
        labels.set_length(L)
        q_pos, k_pos = labels.positions(n, keys.shape[2])
        held = keys[0, 0, :, 0].long() - 1
        filled = held >= 0
        assert torch.equal(q_pos, torch.arange(L - n, L))
        assert torch.equal(k_pos[filled], held[filled])
        assert (k_pos[~filled] >= L).all()  # empty slots sit past the current length ...
        seg = labels.columns(k_pos)[0, 0]
        assert (seg[~filled] == OTHER).all() and (seg[filled] == QUESTION).all()  # ... and read as other
        if kind.startswith("static"):
            assert keys.shape[2] >= min(L, W if kind == "static_sliding" else CAPACITY)


def test_filled_follows_length_and_growth_keeps_labels(tokenizers):
    tok = tokenizers["think"]
    prompts = [[5, 6, 7], [8, 9]]
    lab = RowLabeler(tok, get_profile("think", tok), prompts, "cpu", capacity=4)
    before = lab.labels.table[:, :, :3].clone()
    lab.push([10, 11])
    lab.push([12, None])  # grows past the capacity of 4
    t = lab.labels
    assert t.length == 5 and int(t.filled) == 5 and t.capacity >= 5
    assert torch.equal(t.table[:, :, :3], before)
    assert t.segment[1, 4] == OTHER  # a finished row's token
    assert (t.segment[:, 5:] == OTHER).all() and (t.fire[:, 5:] == -1).all() and (t.step[:, 5:] == 0).all()
