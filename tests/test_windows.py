"""Per-layer sliding windows read from configs of several families."""

from transformers import GptOssConfig, LlamaConfig, MistralConfig, Qwen2Config

from stepscope.windows import layer_windows, sees_bridge

SMALL = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 64}


def test_full_attention_families_have_no_windows():
    assert layer_windows(LlamaConfig(num_hidden_layers=3, **SMALL)) == [None, None, None]


def test_mistral_style_slides_in_every_layer():
    assert layer_windows(MistralConfig(num_hidden_layers=3, sliding_window=16, **SMALL)) == [16, 16, 16]
    assert layer_windows(MistralConfig(num_hidden_layers=2, sliding_window=None, **SMALL)) == [None, None]


def test_layer_types_mark_the_sliding_layers():
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    cfg = GptOssConfig(num_hidden_layers=4, layer_types=types, sliding_window=128, head_dim=8, num_local_experts=2,
                       num_experts_per_tok=1, **SMALL)
    assert layer_windows(cfg) == [128, None, 128, None]


def test_qwen2_windows_only_where_enabled():
    off = Qwen2Config(num_hidden_layers=4, use_sliding_window=False, sliding_window=32, **SMALL)
    assert layer_windows(off) == [None] * 4
    on = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=32, max_window_layers=2, **SMALL)
    assert layer_windows(on) == [None, None, 32, 32]  # layers from max_window_layers on slide


def test_a_window_reaches_the_first_token_only_when_it_spans_the_trace():
    assert sees_bridge(None, 10**6)
    assert sees_bridge(64, 64) and not sees_bridge(64, 65)
