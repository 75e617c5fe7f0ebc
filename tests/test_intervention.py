"""Interventions as plug-ins: the registry, settings from strings, and a test-only plug-in (``question_boost``,
tests/example_intervention.py) run through the full pass, Step-Saliency, generation, ``eval --conditions`` and
the summary, each checked against an independent reference (the model's own attention with a bias mask)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from example_intervention import BoostEdit, QuestionBoost

import stepscope
from stepscope import StepFlowConfig, Trace
from stepscope.attention import install
from stepscope.errors import StepscopeError
from stepscope.labels import QUESTION, THINKING, replay_labels
from stepscope.profiles import get_profile
from stepscope.saliency.engine import target_weights
from stepscope.stepflow import intervention as iv
from stepscope.stepflow.controls import ControlledStepFlow, StepFlowControl
from stepscope.stepflow.fullpass import teacher_forced, teacher_forced_logits
from stepscope.testing import tiny_model

QUESTION_TEXT = "What is (2+3)*2?"
RESPONSE = ("First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now.</think>\n\n"
            "Final answer: 10<|im_end|>")


pytestmark = pytest.mark.usefixtures("quiet")  # warnings are not what these tests check


@pytest.fixture(scope="module")
def trace(tokenizers):
    return Trace.from_text(tokenizers["think"], QUESTION_TEXT, RESPONSE)


def bias_mask(tok, trace: Trace, beta: float) -> torch.Tensor:
    """The causal mask plus log(beta) on (thinking query, question key) pairs, as a 4D additive float mask: what
    the boost does, written as an input the model's own attention applies."""
    labels = replay_labels(tok, [(trace.token_ids, trace.prompt_len, get_profile(trace.profile, tok))])
    T = len(trace)
    role, seg = labels.role[0, :T], labels.segment[0, :T]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    boost = (role == THINKING)[:, None] & (seg == QUESTION)[None, :]
    assert int(boost.tril().sum()) > 0  # the trace has pairs to boost
    return (mask + math.log(beta) * boost.tril().double())[None, None]


# -- the registry ------------------------------------------------------------------------------------------------


def test_the_registry_knows_the_builtins_and_the_plugin():
    kinds = iv.intervention_kinds()
    assert {"stepflow", "stepflow_control", "question_boost"} <= set(kinds)
    assert iv.intervention_type("question_boost") is QuestionBoost
    with pytest.raises(StepscopeError, match="unknown intervention 'nope'"):
        iv.intervention_type("nope")


def test_registration_refuses_what_a_run_could_not_record():
    class NoKind:
        pass

    with pytest.raises(StepscopeError, match="kind"):
        iv.register_intervention(NoKind)

    class NotADataclass:
        kind: ClassVar[str] = "plain_class"

    with pytest.raises(StepscopeError, match="dataclass"):
        iv.register_intervention(NotADataclass)

    @dataclass(frozen=True)
    class Clash:
        kind: ClassVar[str] = "question_boost"
        label: ClassVar[str] = "clash"

        def layers(self, n):
            return frozenset()

        def start(self, handle):
            return []

        def describe(self, n=None):
            return ""

        def to_dict(self):
            return {}

    with pytest.raises(StepscopeError, match="two interventions are registered as 'question_boost'"):
        iv.register_intervention(Clash)
    assert iv.intervention_type("question_boost") is QuestionBoost


def test_records_round_trip_and_stepflow_records_carry_no_kind():
    sf = StepFlowConfig(tau_max=0.3, oeb_layers=(0, 1))
    assert "kind" not in iv.intervention_to_dict(sf)  # run fingerprints from before plug-ins still match
    assert iv.intervention_from_dict(iv.intervention_to_dict(sf)) == sf
    boost = QuestionBoost(3.0, (1,))
    d = iv.intervention_to_dict(boost)
    assert d == {"kind": "question_boost", "beta": 3.0, "on_layers": [1]}
    assert iv.intervention_from_dict(json.loads(json.dumps(d))) == boost
    ctl = ControlledStepFlow(sf, StepFlowControl("random_bridge", 4))
    assert iv.intervention_from_dict(iv.intervention_to_dict(ctl)) == ctl
    with pytest.raises(StepscopeError, match="unknown intervention 'gone'"):
        iv.intervention_from_dict({"kind": "gone", "x": 1})
    assert "not installed here" in iv.describe_dict({"kind": "gone", "x": 1})
    assert iv.describe_dict(d) == "question boost x3 on layers [1]"
    assert iv.describe_dict(None) == "off (plain decoding)"


def test_settings_from_command_line_strings_follow_the_field_types():
    got = iv.parse_option_flags(["question_boost.beta=2.5", "question_boost.on_layers=0-1,3"])
    assert got == {"question_boost": QuestionBoost(2.5, (0, 1, 3))}
    assert iv.settings_from_options("question_boost", {"on_layers": "none"}) == QuestionBoost(2.0, None)
    sf = iv.settings_from_options("stepflow", {"smi": "off", "smi_window": "4", "tau_max": "0.3"})
    assert sf == StepFlowConfig(smi=False, smi_window=4, tau_max=0.3)
    for bad, message in ((["question_boost.beta=lots"], "not a valid float"),
                         (["question_boost.gamma=1"], "has no setting 'gamma'"),
                         (["beta=2"], "KIND.NAME=VALUE"),
                         (["stepflow.smi=maybe"], "not a valid bool")):
        with pytest.raises(StepscopeError, match=message):
            iv.parse_option_flags(bad)


def test_plugins_load_from_the_environment(tmp_path, monkeypatch):
    from stepscope import plugins

    (tmp_path / "env_plugin_mod.py").write_text(
        "from dataclasses import dataclass\nfrom typing import ClassVar\n"
        "from stepscope.stepflow.intervention import register_intervention\n"
        "@register_intervention\n@dataclass(frozen=True)\nclass Nothing:\n"
        "    kind: ClassVar[str] = 'env_nothing'\n    label: ClassVar[str] = 'nothing'\n"
        "    def layers(self, n): return frozenset()\n    def start(self, handle): return []\n"
        "    def describe(self, n=None): return 'nothing'\n    def to_dict(self): return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.ENV, "env_plugin_mod")
    plugins.reset()
    try:
        assert "env_nothing" in iv.intervention_kinds()
        monkeypatch.setenv(plugins.ENV, "no_such_module_here")
        plugins.reset()
        with pytest.raises(StepscopeError, match="cannot import 'no_such_module_here'"):
            iv.intervention_kinds()
    finally:
        monkeypatch.delenv(plugins.ENV)
        plugins.reset()
        sys.modules.pop("env_plugin_mod", None)
        iv._REGISTRY.pop("env_nothing", None)


# -- the plug-in on a model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_pass_equals_the_models_own_attention_with_a_bias_mask(tokenizers, trace, family):
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=3)
    ids = torch.tensor([trace.token_ids])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=bias_mask(tok, trace, 3.0), use_cache=False).logits
    ours = teacher_forced_logits(model, tok, [trace], QuestionBoost(3.0))
    plain = teacher_forced_logits(model, tok, [trace])
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(ours, plain)
    torch.testing.assert_close(teacher_forced_logits(model, tok, [trace], QuestionBoost(1.0)), plain,
                               rtol=1e-12, atol=1e-12)


def test_only_the_named_layers_are_edited(tokenizers, trace):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=3)
    seen: dict[int, torch.Tensor] = {}

    def record(call, proceed):
        out, w = proceed(call)
        seen[call.layer_idx] = out.detach().clone()
        return out, w

    outs = []
    for spec in (None, QuestionBoost(3.0, (1,))):
        with install(model, record, outermost=True):
            teacher_forced_logits(model, tok, [trace], spec)
        outs.append(dict(seen))
    assert torch.equal(outs[0][0], outs[1][0])  # layer 0: untouched, bit for bit
    assert not torch.allclose(outs[0][1], outs[1][1])


def _decode_logits(model, tok, trace: Trace, spec):
    """Teacher-forced decoding: the prompt, then one response token per forward call with a KV cache."""
    from stepscope.generation import cache_kwarg, new_cache

    ids = torch.tensor([trace.token_ids[: trace.prompt_len]])
    kw = {cache_kwarg(model): new_cache(model), "use_cache": True}
    outs = []
    with stepscope.enabled(model, tok, spec), torch.no_grad():
        mask = torch.ones_like(ids)
        outs.append(model(input_ids=ids, attention_mask=mask, **kw).logits[:, -1])
        for t in trace.response_ids[:-1]:
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            outs.append(model(input_ids=torch.tensor([[t]]), attention_mask=mask, **kw).logits[:, -1])
    return torch.cat(outs)


def test_decode_form_equals_full_pass_form(tokenizers, trace):
    tok = tokenizers["think"]
    model = tiny_model("qwen3", tok, layers=3)
    dec = _decode_logits(model, tok, trace, QuestionBoost(3.0))
    full = teacher_forced_logits(model, tok, [trace], QuestionBoost(3.0))[0, trace.prompt_len - 1 : len(trace) - 1]
    torch.testing.assert_close(dec, full, rtol=1e-9, atol=1e-9)


def test_generate_runs_the_plugin_and_records_what_it_did(tokenizers):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=2, scale=3.0)
    qs = ["What is 2+3?", "The farmer has 12 sheep and buys 7 more. How many sheep now?"]
    base = stepscope.generate(model, tok, qs, max_new_tokens=24, progress=False)
    same = stepscope.generate(model, tok, qs, max_new_tokens=24, progress=False, stepflow=QuestionBoost(1.0))
    assert [t.token_ids for t in same] == [t.token_ids for t in base]
    boosted = stepscope.generate(model, tok, qs, max_new_tokens=24, progress=False, stepflow=QuestionBoost(50.0))
    for t in boosted:
        thinking = sum(s.end - s.start for s in t.steps_of("thinking"))
        assert t.meta["stepflow"]["question_boost_queries"] >= thinking > 0  # per layer and thinking token
        assert "flow" not in t.meta  # the flow monitor belongs to StepFlow
    assert [t.token_ids for t in boosted] != [t.token_ids for t in base]


def test_step_saliency_with_the_plugin_matches_brute_force(tokenizers, trace):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=2)
    got = stepscope.step_saliency(model, tok, trace, stepflow=QuestionBoost(3.0), target="all", progress=False)
    assert got.meta["stepflow"] == {"kind": "question_boost", "beta": 3.0, "on_layers": None}
    from stepscope.saliency.describe import stepflow_of, stepflow_settings

    assert stepflow_of(got) is None  # no StepFlow bands to describe
    assert stepflow_settings(got) == "question boost x3 on every layer"
    # brute force: eager attention with the boost as a bias mask, every weight kept with its gradient
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ids = torch.tensor([trace.token_ids])
        out = model(input_ids=ids, attention_mask=bias_mask(tok, trace, 3.0), output_attentions=True,
                    use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        w = target_weights([trace], len(trace), "all", ids.device)[0]
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        (-(logp.gather(-1, ids[0, 1:, None]).squeeze(-1)) * w[:-1]).sum().backward()
        step_of = trace.step_ids()
        S = len(trace.steps)
        want = np.zeros((len(out.attentions), S, S))
        for layer, a in enumerate(out.attentions):
            sal = (a[0] * a.grad[0]).abs().mean(0).detach().double().numpy()
            for i in range(S):
                for j in range(S):
                    want[layer, i, j] = sal[np.ix_(step_of == i, step_of == j)].sum()
    finally:
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(original)
    np.testing.assert_allclose(got.sums, want, rtol=1e-6, atol=1e-10)
    plain = stepscope.step_saliency(model, tok, trace, target="all", progress=False)
    assert not np.allclose(got.sums, plain.sums)


def test_two_edits_of_one_layers_weights_are_refused_for_saliency(tokenizers, trace):
    @dataclass(frozen=True)
    class Twice(QuestionBoost):
        kind: ClassVar[str] = "question_boost_twice"

        def start(self, handle):
            return [BoostEdit(handle, self), BoostEdit(handle, self)]

    iv.register_intervention(Twice)
    try:
        tok = tokenizers["think"]
        model = tiny_model("llama", tok, layers=2)
        with (teacher_forced(model, tok, Twice(2.0), [trace]) as handle,
              pytest.raises(StepscopeError, match="one edit of the weights per layer")):
            handle.saliency_edit(0)
    finally:
        iv._REGISTRY.pop("question_boost_twice", None)


def test_what_is_not_an_intervention_or_cannot_decode_is_refused(tokenizers):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=2)
    with pytest.raises(StepscopeError, match="is not an intervention"):
        stepscope.stepflow.apply(model, tok, {"tau_max": 0.2})
    ctl = ControlledStepFlow(StepFlowConfig(), StepFlowControl("random_bridge"))
    with pytest.raises(StepscopeError, match="teacher-forced passes over finished traces only"):
        stepscope.generate(model, tok, ["What is 2+3?"], max_new_tokens=4, progress=False, stepflow=ctl)
    with pytest.raises(StepscopeError, match="out of range"):
        stepscope.stepflow.apply(model, tok, QuestionBoost(2.0, (5,)))


# -- eval and the summary ----------------------------------------------------------------------------------------




def test_eval_runs_a_plugin_condition_resumes_and_summarises_it(model_dir, tmp_path, capsys):
    from stepscope.cli.main import main

    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps({"q": "What is 2 plus 3?", "a": 5}) + "\n"
                    + json.dumps({"q": "What is 4 times 4?", "a": "16"}) + "\n")
    out = tmp_path / "run"
    args = ["eval", "--model", str(model_dir), "--data-file", str(data), "--question-field", "q", "--answer-field",
            "a", "--n", "2", "--temperature", "0.7", "--max-new-tokens", "6", "--workers", "0", "--no-progress",
            "--n-boot", "100", "--no-plot", "--conditions", "baseline,question_boost",
            "--intervention-option", "question_boost.beta=4", "--out", str(out)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["condition"] for r in records} == {"baseline", "question_boost"}
    assert len(records) == 2 * 2 * 2
    boosted = [r for r in records if r["condition"] == "question_boost"]
    assert all(r["config"]["stepflow"] == {"kind": "question_boost", "beta": 4.0, "on_layers": None}
               for r in boosted)
    trace = json.loads((out / boosted[0]["trace"]).read_text())
    assert trace["meta"]["stepflow"]["question_boost_queries"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["info"]["layers"]["question_boost"] == {"layers": [0, 1]}
    md = (out / "summary.md").read_text()
    assert "| intervention in `question_boost` | question boost x4 on every layer, on layers 0-1 |" in md
    assert set(json.loads((out / "summary.json").read_text())["comparisons"]) == {"question_boost"}
    capsys.readouterr()
    assert main(args) == 0  # resumes: nothing new
    assert "wrote 0 new samples, 8 already done" in capsys.readouterr().out
    changed = [a if a != "question_boost.beta=4" else "question_boost.beta=5" for a in args]
    assert main(changed) == 2
    assert "beta is 4.0 there, 5.0 now" in capsys.readouterr().err
    assert main(["report", str(out), "--n-boot", "100", "--no-plot"]) == 0
    assert "| `question_boost` | `baseline` |" in capsys.readouterr().out


def test_eval_refuses_unknown_plugin_conditions_and_stray_options(model_dir, tmp_path, capsys):
    from stepscope.cli.main import main

    base = ["eval", "--model", str(model_dir), "--dataset", "organism:easy", "--out", str(tmp_path / "x")]
    assert main([*base, "--conditions", "baseline,nonesuch"]) == 2
    assert "unknown condition 'nonesuch'" in capsys.readouterr().err
    assert main([*base, "--conditions", "baseline", "--intervention-option", "question_boost.beta=2"]) == 2
    assert "not among the conditions" in capsys.readouterr().err
    assert main([*base, "--conditions", "baseline,stepflow_control"]) == 2
    assert "unknown condition 'stepflow_control'" in capsys.readouterr().err


def test_conditions_build_plugin_arms_from_defaults_or_settings():
    from stepscope.evaluation.conditions import build_conditions, condition_names

    assert "question_boost" in condition_names() and "stepflow_control" not in condition_names()
    conds = build_conditions(["baseline", "question_boost"], None)
    assert conds[1].intervention == QuestionBoost()
    conds = build_conditions(["question_boost", "oeb-only"], StepFlowConfig(tau_max=0.3),
                             {"question_boost": QuestionBoost(7.0)})
    assert conds[0].intervention == QuestionBoost(7.0)
    assert conds[1].intervention == dataclasses.replace(StepFlowConfig(tau_max=0.3), smi=False)
