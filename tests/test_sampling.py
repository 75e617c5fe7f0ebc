"""Sampling through transformers' logits processors, against hand-written references: the filtered distribution,
greedy decoding with a repetition penalty, batched rows equal to rows alone, stop strings, clear errors, the
recorded settings, and the token-counting progress bar."""

import json
import random
from typing import ClassVar

import numpy as np
import pytest
import torch

import stepscope
from stepscope import StepscopeError
from stepscope.sampling import QWEN3_THINKING, SamplingConfig, StopStrings, logits_processors
from stepscope.testing import tiny_model
from stepscope.textmap import IncrementalDecoder

QUESTIONS = ["What is 2+3?", "The farmer has 12 sheep and buys 7 more. How many sheep now?", "Why?"]


pytestmark = pytest.mark.usefixtures("quiet")  # warnings are not what these tests check


# --- the distribution after the processors, against numpy -------------------------------------------------


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z[np.isfinite(z)].max())
    e[~np.isfinite(z)] = 0.0
    return e / e.sum()


def _reference(logits, seen=(), *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0):
    """transformers' documented order, written out: repetition penalty, temperature, top-k, top-p, min-p."""
    z = np.array(logits, dtype=np.float64)
    for t in set(seen):
        z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
    z = z / temperature
    keep = np.ones(len(z), bool)
    if top_k:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth
    p = _softmax(np.where(keep, z, -np.inf))
    if top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]  # mass of the strictly more likely tokens
        nucleus = np.zeros(len(z), bool)
        nucleus[order[before < top_p]] = True  # the smallest set of top tokens that reaches top_p
        keep &= nucleus
        p = _softmax(np.where(keep, z, -np.inf))
    if min_p > 0:
        keep &= p >= min_p * p.max()
        p = _softmax(np.where(keep, z, -np.inf))
    return p


def _processed(config, logits, seen=None, pad_lengths=None):
    scores = torch.tensor([logits], dtype=torch.float64)
    ids = torch.tensor([list(seen) if seen else [0]], dtype=torch.long)
    out = logits_processors(config, pad_lengths=pad_lengths)(ids, scores)
    return torch.softmax(out, -1)[0].numpy()


LOGITS = np.random.default_rng(3).normal(0, 2.0, 64).round(6)  # distinct values: no ties at the cut-offs


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.6, top_p=0.95, top_k=20),  # Qwen3's thinking setting
    dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.1),
    dict(temperature=0.9, top_p=0.7, penalty=1.7, seen=(3, 5, 9, 3, 40)),
])
def test_the_processed_distribution_equals_a_hand_written_renormalisation(kw):
    seen = kw.pop("seen", ())
    penalty = kw.pop("penalty", 1.0)
    cfg = SamplingConfig(repetition_penalty=penalty, **kw)
    got = _processed(cfg, LOGITS, seen=seen)
    want = _reference(LOGITS, seen, penalty=penalty, **kw)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert (got > 0).sum() == (want > 0).sum()


def test_qwen3_setting_is_expressible():
    assert SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, min_p=0) == QWEN3_THINKING
    names = [type(p).__name__ for p in logits_processors(QWEN3_THINKING)]
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]  # min_p 0: off
    np.testing.assert_allclose(_processed(QWEN3_THINKING, LOGITS),
                               _reference(LOGITS, temperature=0.6, top_p=0.95, top_k=20), atol=1e-12)


def test_greedy_keeps_only_the_penalty_and_the_penalty_skips_left_padding():
    assert len(logits_processors(SamplingConfig(top_k=5, top_p=0.5, min_p=0.2))) == 0
    assert [type(p).__name__ for p in logits_processors(SamplingConfig(repetition_penalty=1.2, top_k=5))] == [
        "RepetitionPenaltyLogitsProcessor"]
    pad = 7
    cfg = SamplingConfig(repetition_penalty=2.0)
    logits = [1.0, -1.0, 2.0, 0.5, 3.0, -2.0, 0.0, 4.0]
    rows = torch.tensor([[pad, pad, 2, 5], [pad, 4, 1, 7]])  # row 1 really generated token 7
    out = logits_processors(cfg, pad_lengths=[2, 1])(rows, torch.tensor([logits, logits], dtype=torch.float64))
    z = np.array(logits)
    want0, want1 = z.copy(), z.copy()
    want0[[2, 5]] = [1.0, -4.0]
    want1[[4, 1, 7]] = [1.5, -2.0, 2.0]
    np.testing.assert_allclose(out.numpy(), [want0, want1])


# --- generation ---------------------------------------------------------------------------------------------


def _greedy_by_hand(model, prompt, steps, penalty):
    """Full forward passes, no cache, the CTRL penalty in numpy, argmax: the slowest possible greedy decoder."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            z = model(torch.tensor([ids])).logits[0, -1].double().numpy().copy()
        for t in set(ids):
            z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
        ids.append(int(np.argmax(z)))
    return ids[len(prompt):]


def test_greedy_with_a_repetition_penalty_picks_what_a_hand_computation_picks(tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    model.generation_config.eos_token_id = None
    kw = dict(max_new_tokens=20, progress=False, ignore_eos=True)
    plain = stepscope.generate(model, tok, QUESTIONS[1], **kw)[0]
    t = stepscope.generate(model, tok, QUESTIONS[1], repetition_penalty=1.8, **kw)[0]
    assert t.response_ids == _greedy_by_hand(model, t.token_ids[: t.prompt_len], 20, 1.8)
    assert t.response_ids != plain.response_ids  # the penalty did something
    assert t.meta["sampling"]["repetition_penalty"] == 1.8
    prompt = torch.tensor([t.token_ids[: t.prompt_len]])
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         repetition_penalty=1.8, pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert t.response_ids == ref[0, t.prompt_len:].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kw", [
    dict(temperature=0.0, repetition_penalty=1.5),
    dict(temperature=0.9, top_k=12, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
])
def test_batched_left_padded_rows_equal_each_row_alone(tokenizers, family, kw):
    tok = tokenizers["think"]
    model = tiny_model(family, tok)
    common = dict(max_new_tokens=16, progress=False, **kw)
    batch = stepscope.generate(model, tok, QUESTIONS, seeds=[11, 12, 13], batch_size=3, **common)
    assert len({t.prompt_len for t in batch}) == 3  # the rows really are padded to different lengths
    for q, s, t in zip(QUESTIONS, [11, 12, 13], batch):
        alone = stepscope.generate(model, tok, q, seeds=[s], **common)[0]
        assert t.token_ids == alone.token_ids
    again = stepscope.generate(model, tok, QUESTIONS, seeds=[11, 12, 13], batch_size=2, **common)
    assert [t.token_ids for t in again] == [t.token_ids for t in batch]  # seeds per row: reproducible


def test_static_cache_and_stepflow_paths_take_the_processors(tokenizers):
    tok = tokenizers["think"]
    model = tiny_model("qwen2", tok)
    kw = dict(max_new_tokens=12, progress=False, temperature=0.8, top_k=10, repetition_penalty=1.4, seeds=[1, 2])
    dynamic = stepscope.generate(model, tok, QUESTIONS[:2], **kw)
    static = stepscope.generate(model, tok, QUESTIONS[:2], cache_implementation="static", **kw)
    assert [t.token_ids for t in static] == [t.token_ids for t in dynamic]
    off = stepscope.StepFlowConfig(tau_max=0.0, alpha=0.0)
    with_sf = stepscope.generate(model, tok, QUESTIONS[:2], stepflow=off, **kw)
    assert [t.token_ids for t in with_sf] == [t.token_ids for t in dynamic]


def _first_stop(tok, prompt_ids, response_ids, stops):
    """Index of the first response token after which the decoded new text contains a stop string, or None."""
    dec = IncrementalDecoder(tok)
    for t in prompt_ids:
        dec.push(t)
    text = ""
    for k, t in enumerate(response_ids):
        text += dec.push(t)
        if any(s in text for s in stops):
            return k
    return None


def test_stop_strings_cut_each_row_independently(tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    model.generation_config.eos_token_id = None
    kw = dict(max_new_tokens=24, progress=False, ignore_eos=True, batch_size=3)
    free = stepscope.generate(model, tok, QUESTIONS, **kw)
    # a stop string from row 0's text (spanning tokens 5-7) and one from row 2's (the tail of token 9 and more)
    texts = [[tok.decode([i]) for i in t.response_ids] for t in free]
    stops = ["".join(texts[0][5:8]).strip() or "".join(texts[0][5:8]), "".join(texts[2][9:11])[1:]]
    stops = [s for s in stops if s]
    cut = stepscope.generate(model, tok, QUESTIONS, stop=stops, **kw)
    hits = 0
    for f, c in zip(free, cut):
        k = _first_stop(tok, f.token_ids[: f.prompt_len], f.response_ids, stops)
        if k is None:
            assert c.token_ids == f.token_ids and c.meta["stop"] == "length"
            continue
        hits += 1
        assert c.response_ids == f.response_ids[: k + 1]  # the token completing the stop string is kept
        assert c.meta["stop"] == "stop_string" and c.meta["stop_string"] in stops
        assert c.meta["stop_string"] in c.response
        assert c.meta["sampling"]["stop"] == stops
    assert hits >= 2


def test_the_stop_matcher_equals_searching_the_whole_text():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 10)))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])] + [""]
        m = StopStrings(stops, 1)
        got, acc = None, ""
        for k, piece in enumerate(pieces):
            acc += piece
            hit = m.push(0, piece)
            if hit is not None:
                got = (k, hit)
                break
        want = None
        acc = ""
        for k, piece in enumerate(pieces):
            acc += piece
            if any(s in acc for s in stops):
                ends = {s: acc.find(s) + len(s) for s in stops if s in acc}
                want = (k, min(ends, key=lambda s: (ends[s], -len(s))))
                break
        assert got == want, (stops, pieces)


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), r"temperature \(--temperature\) must be >= 0"),
    (dict(top_p=0), r"top_p \(--top-p\) must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), r"top_k \(--top-k\) must be >= 0"),
    (dict(top_k=2.5), "top_k .* whole number"),
    (dict(top_k=True), "top_k .* whole number"),
    (dict(min_p=1.5), r"min_p \(--min-p\) must be in \[0, 1\]"),
    (dict(repetition_penalty=0), r"repetition_penalty \(--repetition-penalty\) must be > 0"),
    (dict(temperature=float("nan")), "finite"),
    (dict(temperature="hot"), "must be a number"),
    (dict(stop=[""]), "non-empty"),
    (dict(stop=[3]), "non-empty text"),
])
def test_bad_values_are_a_clear_error(kw, match):
    with pytest.raises(StepscopeError, match=match):
        SamplingConfig(**kw)


def test_generate_takes_the_keywords_and_checks_them(tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    with pytest.raises(StepscopeError, match="top_k"):
        stepscope.generate(model, tok, "q", top_k=-2, progress=False)
    t = stepscope.generate(model, tok, "q", max_new_tokens=3, temperature=0.6, top_p=0.95, top_k=20, min_p=0.0,
                           stop="zzz", progress=False)[0]
    assert t.meta["sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                                  "repetition_penalty": 1.0, "stop": ["zzz"]}
    assert t.meta["temperature"] == 0.6 and t.meta["stop"] in ("eos", "length")


def test_config_normalises_and_round_trips():
    c = SamplingConfig(temperature=1, top_k=20.0, stop="END")
    assert c.temperature == 1.0 and c.top_k == 20 and c.stop == ("END",)
    assert SamplingConfig(stop=["a", "b", "a"]).stop == ("a", "b")
    assert SamplingConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.changed() == {"temperature": 1.0, "top_k": 20, "stop": ["END"]}
    with pytest.raises(StepscopeError, match="unknown sampling field"):
        SamplingConfig.from_dict({"top_q": 1})


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("flags, match", [
    (["--top-k", "-3"], "top_k (--top-k) must be >= 0"),  # plain substrings of stderr
    (["--min-p", "2"], "min_p (--min-p) must be in [0, 1]"),
    (["--repetition-penalty", "0"], "repetition_penalty (--repetition-penalty) must be > 0"),
    (["--stop", ""], "each stop string (--stop) must be non-empty"),
])
def test_the_cli_gives_a_clear_message_not_a_traceback(command, flags, match, tmp_path, capsys, monkeypatch):
    from stepscope.cli.main import main

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("stepscope.models.load_model", no_load)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    args = (["generate", "--question", "1+1?"] if command == "generate"
            else ["eval", "--data-file", str(data), "--out", str(tmp_path / "run")])
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


# --- what a run records -------------------------------------------------------------------------------------


def test_eval_sampling_takes_its_fields_from_the_one_config(tmp_path):
    from stepscope.evaluation.runner import Condition, RunConfig, Sampling, prepare_run_dir

    old = Sampling(n=2, temperature=0.6, top_p=0.95, max_new_tokens=64, seed=1)
    assert old.to_dict() == {"n": 2, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 64, "seed": 1}  # run id kept
    new = Sampling(n=2, temperature=0.6, top_p=0.95, max_new_tokens=64, seed=1, top_k=20, stop=["</answer>"])
    assert new.config == SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, stop=("</answer>",))
    with pytest.raises(StepscopeError, match="top_k"):
        Sampling(top_k=-1)
    with pytest.raises(StepscopeError, match="--n"):
        Sampling(n=0)

    def config(s):
        return RunConfig("m", {"name": "x"}, "sha", 1, s, (Condition("baseline"),))

    assert RunConfig.from_dict(json.loads(json.dumps(config(new).to_dict()))) == config(new)
    record = config(new).record_config(Condition("baseline"))
    assert record["sampling"]["top_k"] == 20 and record["sampling"]["stop"] == ["</answer>"]
    prepare_run_dir(tmp_path / "a", config(old))
    with pytest.raises(StepscopeError, match=r"sampling\.top_k is '<absent>' there, 20 now"):
        prepare_run_dir(tmp_path / "a", config(new))  # a resumed run refuses a changed sampling config
    prepare_run_dir(tmp_path / "b", config(new))
    prepare_run_dir(tmp_path / "b", config(new))
    with pytest.raises(StepscopeError, match=r"sampling\.min_p"):
        prepare_run_dir(tmp_path / "b", config(Sampling(n=2, temperature=0.6, top_p=0.95, max_new_tokens=64,
                                                         seed=1, top_k=20, stop=["</answer>"], min_p=0.1)))


# --- the generation bar counts tokens -----------------------------------------------------------------------


class _FakeBar:
    made: ClassVar[list] = []

    def __init__(self, total=None, desc="", unit="it", *, enabled=True, **kwargs):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.updates: list[int] = []
        self.closed = False
        _FakeBar.made.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake_bar(monkeypatch):
    _FakeBar.made = []
    monkeypatch.setattr("stepscope.progress.bar", _FakeBar)
    return _FakeBar.made


def test_the_generation_bar_counts_tokens_and_credits_rows_that_stop(tokenizers, fake_bar):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    model.generation_config.eos_token_id = None
    free = stepscope.generate(model, tok, QUESTIONS, max_new_tokens=12, batch_size=2, progress=False)
    assert not fake_bar[-1].enabled
    stop = free[0].response_ids[4]  # an end-of-sequence token that row 0 emits early
    model.generation_config.eos_token_id = stop
    fake_bar.clear()
    traces = stepscope.generate(model, tok, QUESTIONS, max_new_tokens=12, batch_size=2)
    bar = fake_bar[-1]
    assert bar.enabled and bar.unit == "token" and bar.total == 3 * 12 and bar.closed
    assert sum(bar.updates) == bar.total
    assert len(bar.updates) > 2  # it moves during a batch, not once per batch
    early = [t for t in traces if t.meta["stop"] == "eos"]
    assert early and all(t.meta["new_tokens"] < 12 for t in early)


def test_the_bar_moves_for_a_single_question(tokenizers, fake_bar):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    t = stepscope.generate(model, tok, "hi", max_new_tokens=6, ignore_eos=True)[0]
    bar = fake_bar[-1]
    assert bar.enabled and bar.total == 6 and bar.updates == [1] * 6 and t.meta["new_tokens"] == 6


def test_filters_at_temperature_zero_are_flagged():
    from stepscope.cli.common import sampling_from_args
    from stepscope.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--question", "q", "--top-k", "20", "--stop", "END", "--stop", "##"])
    with pytest.warns(UserWarning, match="--top-k change nothing at --temperature 0"):
        cfg = sampling_from_args(args)
    assert cfg.top_k == 20 and cfg.stop == ("END", "##")
    args = build_parser().parse_args(["eval", "--dataset", "gsm8k", "--temperature", "0.6", "--top-p", "0.95",
                                      "--top-k", "20", "--min-p", "0"])
    assert sampling_from_args(args) == QWEN3_THINKING
