"""Left-padded batches: ids, mask, positions on the model's device."""

import torch

from stepscope.batch import left_pad, pad_batch, pad_id, positions
from stepscope.testing import tiny_model


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_pad_batch_uses_the_tokenizers_pad_id_and_the_models_device(tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    b = pad_batch(model, tok, [[5, 6], [7]])
    assert b.ids[1, 0] == tok.pad_token_id and b.width == 2
    assert b.ids.device == next(model.parameters()).device
    assert set(b.forward_kwargs()) == {"input_ids", "attention_mask", "position_ids"}
    assert torch.equal(b.positions, positions(b.mask))
    assert pad_id(None) == 0
