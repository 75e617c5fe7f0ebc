"""The attention dispatcher's kernel-friendly grouping (the rest of dispatch is exercised by saliency/StepFlow)."""

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from stepscope.attention.dispatch import AttentionCall, expand_groups_for_sdpa


class _Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True
    layer_idx = 4


def test_repeated_key_value_heads_give_the_same_sdpa_output():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    call = AttentionCall(_Attention(), q, k, v, None, {"scaling": 8**-0.5})
    grouped, _ = sdpa_attention_forward(call.module, q, k, v, None, **call.kwargs)
    flat = expand_groups_for_sdpa(call, force=True)
    assert flat.key.shape == flat.value.shape == (2, 6, 10, 8)
    assert flat.module.num_key_value_groups == 1 and flat.module.layer_idx == 4  # the rest reads through
    out, _ = sdpa_attention_forward(flat.module, flat.query, flat.key, flat.value, None, **flat.kwargs)
    torch.testing.assert_close(out, grouped)
    assert torch.equal(flat.key[:, 0], k[:, 0]) and torch.equal(flat.key[:, 2], k[:, 0])  # head h reads group h // 3


def test_left_alone_off_cuda_for_one_query_and_without_groups():
    q, k = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 5, 8)
    call = AttentionCall(_Attention(), q, k, k, None, {})
    assert expand_groups_for_sdpa(call) is call  # CPU: SDPA's grouped path is already memory-efficient here
    one = AttentionCall(_Attention(), q[:, :, :1], k, k, None, {})
    assert expand_groups_for_sdpa(one, force=True) is one  # decoding: the grouped path is cheaper
