"""The organism build pipeline on a tiny configuration: end to end, cached, resumable, deterministic, loadable."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepscope.errors import StepscopeError
from stepscope.organism import build as build_mod
from stepscope.organism.build import (
    BuildConfig,
    BuildPaused,
    EvalSettings,
    ModelSettings,
    TrainSettings,
    build,
    encode_batch,
    learning_rate,
    list_checkpoints,
    new_model,
    training_problem,
)
from stepscope.organism.checkpoint import TrainState, load_checkpoint, save_checkpoint
from stepscope.organism.tasks import make_problem
from stepscope.organism.template import THINK_CLOSE, build_tokenizer

TINY = BuildConfig(
    seed=7,
    model=ModelSettings(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab_size=300,
                        max_positions=512),
    train=TrainSettings(steps=4, batch_size=2, warmup=1, tokenizer_problems=20),
    eval=EvalSettings(n_per_difficulty=2, max_new_tokens=6, batch_size=2, difficulties=("easy", "medium")),
    checkpoint_every=2,
    log_every=1,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [t for i in range(30) for p in [make_problem("medium", "tok", i)] for t in (p.question, p.response)]
    return build_tokenizer(corpus, 300)


def _weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def test_build_end_to_end_writes_model_and_metadata(cache):
    result = build(TINY, progress=False)
    assert not result.cached
    assert result.path == cache / "organism" / "model"
    names = {p.name for p in result.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "organism.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".pth")) for n in names)  # no pickle anywhere
    meta = json.loads((result.path / "organism.json").read_text())
    assert meta["seed"] == 7 and meta["settings"]["train"]["steps"] == 4
    assert [s for s, _ in meta["loss_curve"]] == [1, 2, 3, 4]
    assert set(meta["heldout"]) == set(meta["accuracy"]) == {"easy", "medium"}
    assert meta["heldout"]["medium"]["n"] == 2
    for key in ("hazard_long", "hazard_local", "error_kinds", "long_range_step_share"):
        assert key in meta["heldout"]["medium"]
    assert meta["wall_seconds"]["train"] > 0
    assert meta["model"]["layers"] == 2
    assert len(list_checkpoints(cache / "organism" / "checkpoints")) == 2  # steps 2 and 4

    # A second build with the same settings is instant and changes nothing.
    stamp = (result.path / "model.safetensors").stat().st_mtime_ns
    again = build(TINY, progress=False)
    assert again.cached and again.metadata == meta
    assert (result.path / "model.safetensors").stat().st_mtime_ns == stamp

    # Other settings do not silently replace a finished build; --force does.
    other = TINY.with_overrides(steps=2)
    with pytest.raises(StepscopeError, match="--force"):
        build(other, progress=False)
    forced = build(other, force=True, progress=False)
    assert not forced.cached and forced.metadata["settings"]["train"]["steps"] == 2


def test_a_changed_difficulty_ladder_refreshes_the_heldout_numbers_not_the_weights(cache, monkeypatch):
    from stepscope.organism.tasks import DIFFICULTIES, Difficulty

    first = build(TINY, progress=False)
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    harder = Difficulty("easy", 2, 2, long_steps=1, reach=2, max_value=20, max_addend=5)
    monkeypatch.setitem(DIFFICULTIES, "easy", harder)
    again = build(TINY, progress=False)
    assert again.cached
    assert again.metadata["heldout_difficulties"]["easy"]["max_steps"] == 2
    assert first.metadata["heldout_difficulties"]["easy"]["max_steps"] == 4
    assert again.metadata["heldout"]["easy"]["n"] == 2 and "heldout_measured" in again.metadata
    assert json.loads((again.path / "organism.json").read_text()) == again.metadata
    assert (again.path / "model.safetensors").stat().st_mtime_ns == stamp  # the weights are kept
    assert build(TINY, progress=False).metadata == again.metadata  # now up to date: nothing re-measured


def test_interrupted_build_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    straight = build(TINY, out=tmp_path / "a", progress=False)

    real_save = build_mod.save_checkpoint
    calls = []

    def save_then_die(root, model, optimizer, state, keep=2):
        real_save(root, model, optimizer, state, keep)
        calls.append(state.step)
        raise KeyboardInterrupt  # the user stops the build right after the first checkpoint

    monkeypatch.setattr(build_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(TINY, out=tmp_path / "b", progress=False)
    assert calls == [2] and not (tmp_path / "b" / "model").exists()
    monkeypatch.setattr(build_mod, "save_checkpoint", real_save)

    seen = []
    real_load = build_mod.load_checkpoint

    def spy_load(path, model, optimizer):
        state = real_load(path, model, optimizer)
        seen.append(state.step)
        return state

    monkeypatch.setattr(build_mod, "load_checkpoint", spy_load)
    resumed = build(TINY, out=tmp_path / "b", progress=False)
    assert seen == [2]
    a, b = _weights(straight.path), _weights(resumed.path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same seed, same data order, exact resume: identical weights
    assert resumed.metadata["loss_curve"] == straight.metadata["loss_curve"]


def test_time_budget_pauses_after_a_checkpoint_and_the_next_call_continues(tmp_path):
    cfg = TINY.with_overrides(steps=3)
    straight = build(cfg, out=tmp_path / "a", progress=False)
    paused_at = []
    for _ in range(5):
        try:
            done = build(cfg, out=tmp_path / "b", progress=False, max_minutes=0)  # pause after every step
            break
        except BuildPaused as e:
            paused_at.append(e.args[0].split("step ")[1].split("/")[0])
    assert paused_at == ["1", "2"]
    a, b = _weights(straight.path), _weights(done.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert done.metadata["loss_curve"] == straight.metadata["loss_curve"]


def test_loaded_organism_uses_the_think_profile_and_segments_into_steps(cache):
    from stepscope.models import load_model
    from stepscope.profiles import THINK, detect_profile
    from stepscope.trace import Trace

    build(TINY, progress=False)
    model, tok = load_model("organism", device="cpu")
    assert detect_profile(tok) is THINK
    prompt = tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<think>\n")
    p = make_problem("medium", "seg", 0)
    trace = Trace.from_text(tok, p.question, p.response + tok.eos_token)
    kinds = [s.kind for s in trace.steps]
    assert kinds[0] == "question"
    assert kinds.count("thinking") == len(p.steps)
    assert kinds.count("summary") == 2
    assert THINK_CLOSE in trace.steps_of("thinking")[-1].text
    assert trace.steps_of("summary")[-1].text.startswith("The answer is")
    # The loaded model generates through the standard API.
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3 or tok.eos_token_id in out[0].tolist()


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path, tokenizer):
    cfg = TINY
    model = new_model(cfg.model, tokenizer, seed=1)
    opt = build_mod._optimizer(model, cfg.train)
    batch = encode_batch(tokenizer, [training_problem(cfg, k, frozenset()) for k in range(2)])
    model(**batch).loss.backward()
    opt.step()
    torch.manual_seed(123)
    save_checkpoint(tmp_path, model, opt, TrainState(1, "fp", [[1, 2.5]], 3.0))
    expected_rand = torch.rand(3)

    model2 = new_model(cfg.model, tokenizer, seed=2)
    opt2 = build_mod._optimizer(model2, cfg.train)
    state = load_checkpoint(tmp_path / "step-000001", model2, opt2)
    assert (state.step, state.fingerprint, state.loss_curve, state.train_seconds) == (1, "fp", [[1, 2.5]], 3.0)
    assert torch.equal(torch.rand(3), expected_rand)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for idx in s1["state"]:
        for name, t in s1["state"][idx].items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(s2["state"][idx][name]))
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()  # still tied


def test_training_batches_mask_the_prompt(tokenizer):
    batch = encode_batch(tokenizer, [make_problem("easy", "b", 0), make_problem("hard", "b", 0)])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    for row in range(2):
        supervised = (labels[row] != -100).nonzero().flatten()
        first = int(supervised[0])
        # Supervision starts right after the "<think>\n" that ends the prompt and ends with EOS.
        assert tokenizer.decode(ids[row, :first]).endswith("<think>\n")
        assert int(labels[row, supervised[-1]]) == tokenizer.eos_token_id
        assert int(mask[row].sum()) == int(supervised[-1]) + 1


def test_training_stream_is_deterministic_and_avoids_heldout_questions():
    a = [training_problem(TINY, k, frozenset()).question for k in range(6)]
    assert a == [training_problem(TINY, k, frozenset()).question for k in range(6)]
    banned = frozenset([a[3]])
    assert training_problem(TINY, 3, banned).question != a[3]


def test_learning_rate_schedule():
    ts = TrainSettings(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(ts, 0) == pytest.approx(0.1)
    assert learning_rate(ts, 9) == pytest.approx(1.0)
    assert learning_rate(ts, 100) == pytest.approx(0.1)
    assert all(learning_rate(ts, s) >= learning_rate(ts, s + 1) for s in range(10, 100))


def test_config_json_round_trip_and_validation():
    again = BuildConfig.from_dict(json.loads(json.dumps(TINY.settings())))
    assert again.fingerprint() == TINY.fingerprint()
    with pytest.raises(StepscopeError, match="unknown organism settings"):
        BuildConfig.from_dict({"sed": 1})
    with pytest.raises(StepscopeError, match="bad organism settings"):
        BuildConfig.from_dict({"model": {"layerz": 3}})
    with pytest.raises(StepscopeError, match="unknown difficulty"):
        BuildConfig.from_dict({"train": {"mix": [["nightmare", 1.0]]}})
    named = BuildConfig.from_dict({"train": {"mix": [["easy", 1.0]]}})
    assert named.train.mix[0][0].name == "easy"
    with pytest.raises(StepscopeError, match="positive weight"):
        build(BuildConfig.from_dict({"train": {"mix": [["easy", 0.0]]}}), progress=False)
    with pytest.raises(StepscopeError, match="unknown difficulty"):
        build(replace(TINY, eval=replace(TINY.eval, difficulties=("nightmare",))), progress=False)


def _cli(argv):
    from stepscope.cli import organism as cli

    parser = argparse.ArgumentParser(prog="stepscope")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_build_info_sample_and_errors(cache, tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY.settings()))
    assert _cli(["organism", "build", "--config", str(cfg), "--quiet"]) == 0
    assert "organism built" in capsys.readouterr().out
    assert _cli(["organism", "build", "--config", str(cfg), "--quiet"]) == 0
    assert "cached" in capsys.readouterr().out
    assert _cli(["organism", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 7
    assert _cli(["organism", "sample", "-n", "1", "--difficulty", "easy"]) == 0
    assert "</think>" in capsys.readouterr().out
    with pytest.raises(StepscopeError, match="--steps"):
        _cli(["organism", "build", "--steps", "0"])
    with pytest.raises(StepscopeError, match="not valid JSON"):
        cfg.write_text("{")
        _cli(["organism", "build", "--config", str(cfg)])
    with pytest.raises(StepscopeError, match="say what to do"):
        _cli(["organism"])
    with pytest.raises(StepscopeError, match="no organism is built"):
        _cli(["organism", "info", "--out", str(tmp_path / "nowhere")])


@pytest.mark.slow
def test_the_built_organism_writes_the_paper_trace_shape():
    """On a machine where `stepscope organism build` has run: a greedy trace has Q, several T, and S."""
    from stepscope.models import load_model, organism_path
    from stepscope.organism.evaluate import greedy_responses
    from stepscope.trace import Trace

    try:
        organism_path()
    except StepscopeError:
        pytest.skip("the organism is not built in this cache")
    model, tok = load_model("organism", device="cpu")
    p = make_problem("medium", "slowcheck", 0)
    [response], _ = greedy_responses(model, tok, [p.question], max_new_tokens=320)
    trace = Trace.from_text(tok, p.question, response)
    assert len(trace.steps_of("thinking")) >= 3
    assert trace.steps_of("summary")
